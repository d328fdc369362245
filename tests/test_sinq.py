"""SINQ through the sinq package: its encoding, its forward checked, transformers' path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qexp.config import validate
from qexp.errors import ConfigError
from qexp.run import run
from tests.conftest import ROOT, load_spec, subject, without_module

pytest.importorskip("sinq")

# transformers' own SINQ path on the same checkpoint: from_pretrained with SinqConfig, every
# SINQLinear de-quantized (in a child: SinqConfig patches from_pretrained process-wide)
REFERENCE = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, SinqConfig
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu",
    quantization_config=SinqConfig(nbits=4, group_size=64, modules_to_not_convert=["lm_head"]))
out = {n: mod.dequantize().float().contiguous() for n, mod in m.named_modules()
       if type(mod).__name__ == "SINQLinear"}
save_file(out, sys.argv[2])
"""


def test_weights_are_what_transformers_sinqconfig_computes(make_cfg, tmp_path):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=sinq4")
    model, q = loaded.model, spec.quantizer
    model.save_pretrained(tmp_path / "fp")
    before = {n: m.weight.detach().clone() for n, m in q.quantized_linears(model)}
    res = q.quantize(subject(model, loaded.tokenizer), ctx)
    assert res.info["library"] == "sinq 0.2.0" and res.info["modules"] == len(before) == 14
    assert res.info["kernel_vs_dequant_max_rel_err"] <= q.kernel_tol
    assert res.info["rtn_fallback"] == []  # random Gaussian weights: kurtosis ~3
    p = subprocess.run(
        [sys.executable, "-c", REFERENCE, str(tmp_path / "fp"), str(tmp_path / "ref.st")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    ref = load_file(tmp_path / "ref.st")
    assert sorted(ref) == sorted(before)
    for name, lin in q.quantized_linears(model):
        w = lin.weight.detach()
        assert torch.equal(w, ref[name]), name
        rel = float((w - before[name]).norm() / before[name].norm())
        assert 0.01 < rel < 0.15, (name, rel)
    assert torch.equal(model.lm_head.weight, loaded.model.lm_head.weight)


def test_heavy_tailed_weight_is_reported_as_rtn_fallback(make_cfg, tmp_path):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=sinq4")
    down = loaded.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        down.weight[0, :4] = 50 * down.weight.abs().max()  # kurtosis far above 5
    res = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    assert res.info["rtn_fallback"] == ["model.layers.1.mlp.down_proj"]


def test_run_records_sinq(make_cfg, tmp_path):
    run(make_cfg("quantizer=sinq4", "conditions=[original,original_q]"), tmp_path)
    info = json.loads((tmp_path / "results.json").read_text())["quantization"]["original"]
    assert info["library"].startswith("sinq ") and (info["bits"], info["group_size"]) == (4, 64)


def test_bad_group_and_bits_are_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"quantizer.group_size=128 .*: one of \[32, 64\]"):
        run(make_cfg("quantizer=sinq4", "quantizer.group_size=128"), tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    with pytest.raises(ConfigError, match=r"bits=7"):
        validate(make_cfg("quantizer=sinq4", "quantizer.bits=7"))


def test_missing_library_names_the_install(make_cfg, tmp_path, monkeypatch):
    without_module(monkeypatch, "sinq")
    with pytest.raises(ConfigError, match=r"--no-deps sinq==0.2.0"):
        run(make_cfg("quantizer=sinq4"), tmp_path / "run")
