"""SINQ through the sinq package: its encoding, its forward checked, transformers' path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
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


def structured_weight(rows: int, cols: int) -> torch.Tensor:
    """Gaussian weights with log-normal row and column scales, as trained layers have (on
    i.i.d. Gaussian matrices all column deviations are nearly equal and sinq's Sinkhorn
    iterate of least imbalance is a near tie that tiny moves flip)."""
    g = torch.Generator().manual_seed(0)
    col = torch.exp(0.5 * torch.randn(1, cols, generator=g))
    row = torch.exp(0.3 * torch.randn(rows, 1, generator=g))
    return torch.randn(rows, cols, generator=g) * 0.02 * col * row


def test_codes_are_sinqlinears_and_boxes_hold_them_for_sparse_moves():
    """The target's codes are what SINQLinear stores; moving 1% of the weights to 90% of
    their box keeps nearly every group's codes, moving them half a box past it does not."""
    from sinq.quantizer import Quantizer as SQ
    from sinq.quantizer import dq8
    from sinq.sinqlinear_hf import SINQLinear

    from qexp.quantizers.library.sinq import SINQQuant

    q = SINQQuant()
    w = structured_weight(128, 256)
    lin = SINQLinear(
        in_features=256,
        out_features=128,
        bias=False,
        quant_config=q.library_config(),
        compute_dtype=torch.float32,
        device="cpu",
        use_unpack_kernel=True,
    )
    lin.quantize(w)
    codes, zero = q._encode(w)
    stored = SQ.unpack[lin.meta["packing"]](lin.W_q, dtype=torch.float32)
    assert torch.equal(stored.reshape(w.shape).to(torch.int16), codes)
    assert torch.equal(dq8(lin.meta["zero"]).float().reshape(-1, 1), zero)

    lo, hi = q.tensor_box("w", w)
    wd = w.double()
    assert (lo <= wd).all() and (wd <= hi).all()
    assert ((lo == hi).reshape(-1, 64).sum(1) >= 2).all()  # every group's min and max
    g = torch.Generator().manual_seed(1)
    pick = (torch.rand(w.shape, generator=g) < 0.01) & (lo < hi)
    down = torch.rand(w.shape, generator=g) < 0.5
    want = q.tensor_codes("w", w)
    near = torch.where(pick, torch.where(down, wd + 0.9 * (lo - wd), wd + 0.9 * (hi - wd)), wd)
    bad = (q.tensor_codes("w", near.float()) != want).reshape(128, 4, -1).any(-1)
    assert float(bad.float().mean()) <= 0.01
    past = torch.where(pick, torch.where(down, lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)), wd)
    assert float((q._encode(past.float())[0] != codes)[pick].float().mean()) >= 0.95


def test_gap_through_sinq_keeps_sinqs_codes(make_cfg, tmp_path):
    from tests.test_gap import FAST

    overrides = [*FAST, "attack.targets=[sinq4]", f"cache_dir={tmp_path / 'cache'}", "cache=on"]
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, *overrides)
    model = loaded.model
    m = spec.attack.apply(subject(model, loaded.tokenizer), ctx).info
    assert m["codes_equal_injected"] == {"sinq4": True}
    ver = m["library_verification"]
    assert ver["sinq4"]["blocks"] > 0 and 0.0 <= ver["sinq4"]["verified_before_reset"] <= 1.0
    assert 0.0 <= ver["weights_reset_fraction"] <= 1.0
    (entry,) = (ctx.cache_dir / "stages" / "gap_inject").glob("*/tensors.safetensors")
    injected = load_file(str(entry))
    params = dict(model.named_parameters())
    q = spec.attack.quantizers[0]
    for n in m["trainable"]:  # independently: sinq's codes and zeros are the injected ones'
        got, want = q._encode(params[n]), q._encode(injected[n])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), n
