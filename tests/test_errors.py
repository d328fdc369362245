"""Bad input as a demanding user makes it: one `qexp: config error:` line and exit 2, before
any model loads where the check needs no weights; no hang; a finished run is never lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CLI_TINY, ROOT, cli_env, qexp_batch

pytestmark = pytest.mark.slow
TINY = [*CLI_TINY, "similarity.enabled=false", "conditions=[original,original_q]"]
NOISE = ("torchao", "_pytree", "Traceback")


def cli(*args, cache_dir, env=None, module="qexp", timeout=300):
    """Run a qexp command the way a user does (offline: the tests never use the hub)."""
    full = cli_env(cache_dir, env)
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full,
        timeout=timeout,
    )
    p.seconds = time.perf_counter() - t0
    return p


def one_line_error(p, *needles: str) -> str:
    """Exit 2 and exactly one stderr line, qexp's format, naming every needle."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(("qexp: config error:", "qexp-encrypt: error:", "qexp-audit:"))
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not any(x in p.stdout + p.stderr for x in NOISE)
    return lines[0]


def test_truncated_checkpoints_fail_fast_naming_file_and_tensor(tmp_path, cache_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    src = tmp_path / "ckpt"
    LlamaForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 1000])
    # encrypt used to spin forever on this file
    out = str(tmp_path / "out")
    p = cli(
        str(src),
        out,
        "kappa_one_layers=0",
        cache_dir=cache_dir,
        module="qexp.tools.encrypt",
        timeout=60,
    )
    line = one_line_error(p, "model.safetensors", "truncated", "tensor")
    assert not (tmp_path / "out").exists(), line
    p = cli(str(src), "--out", str(tmp_path / "audit"), cache_dir=cache_dir, module="qexp.audit")
    one_line_error(p, "model.safetensors", "truncated", "tensor")
    p = cli(
        *TINY, "model=hf", f"model.id={src}", f"hydra.run.dir={tmp_path / 'r'}", cache_dir=cache_dir
    )
    one_line_error(p, "model.id", "truncated")
    assert not (tmp_path / "r" / "results.json").exists()


def test_a_complete_result_is_never_overwritten(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run_dir}"]
    (first,) = qexp_batch([args], tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (run_dir / "results.json").read_bytes()
    assert json.loads(before)["status"] == "complete"
    # another config into the same dir; one that fails later (at validation); the same one
    other, invalid, same = qexp_batch(
        [[*args, "seed=1"], [*args, "benchmark.limit=-3"], args], tmp_path, cache_dir
    )
    one_line_error(other, "hydra.run.dir", str(run_dir))  # refused, nothing touched
    assert invalid.returncode == 2
    assert same.returncode == 0 and "skipped" in same.stderr  # nothing to do
    assert (run_dir / "results.json").read_bytes() == before


BAD_INPUTS = [
    ("device=cuda", ["device='cuda'", "no CUDA GPU"]),
    ("device=cuda:abc", ["device='cuda:abc'", "cuda:N"]),
    ("quantizer=gptq5", ["quantizer='gptq5'", "gptq4", "rtn4"]),
    ("attack.kappaa=3", ["attack.kappaa", "+attack.kappaa"]),
    ("attack=encrypt attack.kappaa=3", ["attack.kappaa", "kappa_one_layers"]),
    ("attack=gap attack.targets=[gptq4]", ["attack.targets='gptq4'", "bnb_nf4"]),
    ("attack=encrypt attack.band=[0,5]", ["attack.band", "2 layers"]),
    ("similarity.enabled=true similarity.encoder=/nonexistent", ["similarity.encoder"]),
    ("benchmark.source=hub", ["benchmark.hub_id", "ChilleD/SVAMP"]),
    ("model=llama8b", ["DeepSeek-R1-Distill-Llama-8B", "not in the cache", "hf download"]),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, cache_dir):
    """Every BAD_INPUTS command, run by qexp's entry point in one interpreter."""
    root = tmp_path_factory.mktemp("bad-inputs")
    cases = [
        [*TINY, *override.split(), f"hydra.run.dir={root / str(i)}"]
        for i, (override, _) in enumerate(BAD_INPUTS)
    ]
    env = {"HF_HUB_CACHE": str(root / "empty-hub-cache")}
    return root, qexp_batch(cases, root, cache_dir, env)


@pytest.mark.parametrize(("i", "override", "needles"), [(i, *c) for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_one_line_before_any_model_loads(bad_input_runs, i, override, needles):
    root, runs = bad_input_runs
    one_line_error(runs[i], *needles)
    assert not (root / str(i) / "results.json").exists()  # refused before the pipeline started


BAD_FILES = {
    "empty.json": "[]",
    "text_answer.json": json.dumps([{"Body": "b", "Question": "q?", "Answer": "seven"}]),
    "broken.jsonl": '{"Body": "a", "Question": "q", "Answer": 1}\n'
    '{"Body": "b", "Question": "q", "Answer": 2}\n{"Body": oops}\n',
    "instruct_fields.jsonl": json.dumps({"prompt": "x", "completion": "y"}) + "\n",
}
BAD_FILE_CASES = [
    ("empty.json", [], ["benchmark.path", "at least one row"]),
    ("text_answer.json", [], ["text_answer.json[0]", "numeric Answer"]),
    ("broken.jsonl", [], ["broken.jsonl:3"]),
    ("instruct_fields.jsonl", ["benchmark=instruct"], ["instruct_fields.jsonl:1", "Alpaca"]),
]


@pytest.fixture(scope="module")
def bad_file_runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("bad-files")
    for name, text in BAD_FILES.items():
        (root / name).write_text(text)
    cases = [
        [*TINY, *extra, f"benchmark.path={root / name}", f"hydra.run.dir={root / str(i)}"]
        for i, (name, extra, _) in enumerate(BAD_FILE_CASES)
    ]
    return root, qexp_batch(cases, root, cache_dir)


@pytest.mark.parametrize(
    ("i", "name", "needles"), [(i, n, nd) for i, (n, _, nd) in enumerate(BAD_FILE_CASES)]
)
def test_bad_benchmark_files_fail_at_validation(bad_file_runs, i, name, needles):
    root, runs = bad_file_runs
    one_line_error(runs[i], *needles)
    assert not (root / str(i) / "results.json").exists()


def tiny_checkpoint(path: Path, model_type: str, **kw) -> Path:
    """A tiny random checkpoint of an architecture (config + safetensors, no tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **kw)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_an_unsupported_architecture_is_refused_from_its_config(tmp_path, cache_dir):
    ckpt = tiny_checkpoint(tmp_path / "gpt2", "gpt2", n_embd=32, n_layer=2, n_head=2)
    run_dir = tmp_path / "run"
    p = cli(
        *TINY,
        "model=hf",
        f"model.id={ckpt}",
        "attack=encrypt",
        f"hydra.run.dir={run_dir}",
        cache_dir=cache_dir,
    )
    one_line_error(p, "architecture", "gpt2", "llama")
    assert not (run_dir / "results.json").exists()


def test_a_corrupted_cache_entry_is_named_and_recomputed(tmp_path, cache_dir):
    cache = tmp_path / "cache"
    args = [*TINY, "attack=encrypt", "attack.kappa_one_layers=0", "cache=on"]
    args += ["conditions=[attacked]", f"cache_dir={cache}"]
    assert cli(*args, f"hydra.run.dir={tmp_path / 'a'}", cache_dir=cache).returncode == 0
    (blob,) = (cache / "stages" / "attack").glob("*/model.safetensors")
    blob.write_bytes(blob.read_bytes()[:100])  # a crash mid-copy, a full disk, bit rot
    (meta,) = (cache / "stages" / "evaluate").glob("*/meta.json")
    meta.write_text("{not json")
    p = cli(*args, f"hydra.run.dir={tmp_path / 'b'}", cache_dir=cache)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert f"entry {blob.parent}" in out and "corrupted" in out
    assert f"entry {meta.parent}" in out
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert b["cache"] == {"attacked/attack": "stored", "attacked": "stored"}
    assert a["conditions"]["attacked"]["ref_ppl"] == b["conditions"]["attacked"]["ref_ppl"]


def test_help_is_qexps_own_and_quiet(cache_dir):
    p = cli("--help", cache_dir=cache_dir)
    assert p.returncode == 0
    assert p.stdout.startswith("qexp")
    assert not any(x in p.stdout + p.stderr for x in NOISE)


def test_a_killed_job_can_be_told_from_a_running_one(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "QEXP_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    args = [*TINY, "benchmark.limit=32", "benchmark.max_new_tokens=64", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qexp", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = run_dir / "results.json"
    deadline = time.time() + 240
    while not results.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert results.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    body = json.loads(results.read_text())
    assert body["status"] == "running"  # what a kill leaves behind ...
    prov = body["provenance"]
    assert prov["pid"] == proc.pid and prov["host"] and body["heartbeat_utc"]
    with pytest.raises(ProcessLookupError):  # ... and why a reader knows it is not running
        os.kill(prov["pid"], 0)


def test_outputs_follow_the_umask_and_stale_temp_dirs_go(tmp_path, cache_dir):
    cache = tmp_path / "cache"
    stale = cache / "stages" / "evaluate" / ".deadbeef.x1.tmp"
    stale.mkdir(parents=True)
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    run_dir = tmp_path / "run"
    env = {"QEXP_CACHE_DIR": str(cache)}
    p = subprocess.run(
        [
            "sh",
            "-c",
            f'umask 022 && exec {sys.executable} -m qexp "$@"',
            "sh",
            *TINY,
            "cache=on",
            f"cache_dir={cache}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env={**os.environ, **env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run_dir / "results.json").stat().st_mode & 0o777 == 0o644
    assert (run_dir / "generations").stat().st_mode & 0o777 == 0o755
    entries = list((cache / "stages" / "evaluate").glob("[!.]*/meta.json"))
    assert entries and all(e.parent.stat().st_mode & 0o777 == 0o755 for e in entries)
    assert not stale.exists()


def test_int8_warning_is_shown_once(tmp_path, cache_dir):
    pytest.importorskip("bitsandbytes")
    p = cli(*TINY, "quantizer=bnb_int8", f"hydra.run.dir={tmp_path / 'r'}", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (p.stdout + p.stderr).count("MatMul8bitLt: inputs will be cast") <= 1


def test_reference_perplexity_fits_a_model_with_few_positions(tmp_path, cache_dir):
    ckpt = tiny_checkpoint(
        tmp_path / "short",
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    )
    from qexp.models.tiny import tiny_tokenizer

    tiny_tokenizer(512).save_pretrained(ckpt)
    run_dir = tmp_path / "run"
    p = cli(
        *TINY,
        "model=hf",
        f"model.id={ckpt}",
        "conditions=[original]",
        f"hydra.run.dir={run_dir}",
        cache_dir=cache_dir,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ppl = json.loads((run_dir / "results.json").read_text())["conditions"]["original"]["ref_ppl"]
    assert torch.isfinite(torch.tensor(ppl))
