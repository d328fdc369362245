"""The real-scale path at toy size: bench/synthetic.py's sharded checkpoint through the
streaming tools and the audit, and bench/gpu_smoke.py on a machine without CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from qexp.audit.cli import main as audit_main
from qexp.checkpoint.reader import Checkpoint
from qexp.checkpoint.safetensors_io import SafetensorsError
from qexp.core.geometry import param_count
from qexp.tools.canonicalize import canonicalize_checkpoint, load_defense
from qexp.tools.encrypt import encrypt_checkpoint, load_attack
from tests.conftest import ROOT, cli_env


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A Llama-3-shaped toy (untied, 8/2 heads) written like the 8B one: sharded + index."""
    syn = _bench("synthetic")
    monkeypatch.setitem(
        syn.GEOMETRIES,
        "toy",
        dict(hidden=128, layers=3, heads=8, kv=2, inter=256, vocab=512, tied=False, theta=5e5),
    )
    info = syn.write_checkpoint(tmp_path / "toy", "toy", shard_gb=100_000 / 2**30)
    return tmp_path / "toy", info


def test_synthetic_checkpoint_is_sharded_indexed_and_loads(toy):
    src, info = toy
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert info["shards"] == len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n == info["params"] == param_count(json.loads((src / "config.json").read_text()))
    assert index["metadata"]["total_size"] == 2 * n


def test_streaming_tools_and_audit_on_the_sharded_toy(toy, tmp_path):
    src, _ = toy
    encrypt_checkpoint(src, tmp_path / "enc", load_attack(["preset=exact"]), progress=False)
    canonicalize_checkpoint(src, tmp_path / "can", load_defense([]), progress=False)
    for out in ("enc", "can"):  # index and shard layout kept, loadable
        assert (tmp_path / out / "model.safetensors.index.json").read_bytes() == (
            src / "model.safetensors.index.json"
        ).read_bytes()
        AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.bfloat16)
    with Checkpoint(src) as a, Checkpoint(tmp_path / "can") as b:
        assert sum(not torch.equal(a.get(n), b.get(n)) for n in a.names) > 0
    rc_clean = audit_main([str(src), "--out", str(tmp_path / "a0"), "--no-progress", "--no-plots"])
    rc_enc = audit_main(
        [str(tmp_path / "enc"), "--out", str(tmp_path / "a1"), "--no-progress", "--no-plots"]
    )
    assert rc_clean == 0
    rep = json.loads((tmp_path / "a1" / "audit.json").read_text())
    assert rc_enc == 1 and "reparam" in rep["suspicious_checks"]


def test_checkpoint_view_maps_the_bytes_get_reads_and_never_writes_back(toy, tmp_path):
    src, _ = toy
    with Checkpoint(src) as ckpt:
        for name in ckpt.names:
            ckpt.prefetch(name)
            assert torch.equal(ckpt.view(name), ckpt.get(name))
        name = ckpt.names[-1]
        v = ckpt.view(name)
        v.fill_(1.0)  # a private mapping: the write stays in this process
        assert not torch.equal(ckpt.get(name), v) and not torch.equal(ckpt.view(name), v)
    shard = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    cut = tmp_path / shard.name
    cut.write_bytes(shard.read_bytes())
    with Checkpoint(cut) as ckpt, pytest.raises(SafetensorsError, match="truncated"):
        os.truncate(cut, cut.stat().st_size - 8)  # shrunk after it was opened: no SIGBUS
        ckpt.view(ckpt.names[-1])


@pytest.mark.slow
def test_gpu_smoke_runs_on_cpu_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "smoke.json"
    rows = "rtn4_cuda_vs_cpu,encrypt_exact_cuda,pipeline_encrypt_exact,bnb_nf4_cuda"
    p = subprocess.run(
        [sys.executable, "bench/gpu_smoke.py", "--out", str(out), "--rows", rows],
        cwd=ROOT,
        env=cli_env(tmp_path / "cache", {"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["environment"]["cuda"] is False
    r = res["rows"]
    for cuda_only in ("rtn4_cuda_vs_cpu", "encrypt_exact_cuda", "bnb_nf4_cuda"):
        assert r[cuda_only]["status"] == "skipped", r[cuda_only]
        assert "no CUDA device" in r[cuda_only]["reason"]
    assert r["pipeline_encrypt_exact"]["status"] == "ok"
    assert r["pipeline_encrypt_exact"]["run_status"] == "complete"
    assert r["pipeline_encrypt_exact"]["device"] == "cpu"
