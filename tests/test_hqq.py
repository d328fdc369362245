"""HQQ through the hqq package: the library's encoding, its forward checked, errors."""

from __future__ import annotations

import json

import pytest
import torch

from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from tests.conftest import levels_per_group, load_spec, subject, without_module

pytest.importorskip("hqq")


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_are_hqq_groups_and_its_forward_matches(make_cfg, tmp_path, bits):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, f"quantizer=hqq{bits}")
    model, q = loaded.model, spec.quantizer
    before = {n: m.weight.detach().clone() for n, m in q.quantized_linears(model)}
    res = q.quantize(subject(model, loaded.tokenizer), ctx)
    assert res.info["library"].startswith("hqq 0.2.8")
    assert res.info["modules"] == len(before) == 14
    assert res.info["kernel_vs_dequant_max_rel_err"] <= q.kernel_tol
    for name, lin in q.quantized_linears(model):
        w, w0 = lin.weight.detach(), before[name]
        assert not torch.equal(w, w0), name
        assert levels_per_group(w, 64) <= 2**bits, name  # a scale and zero point per group
        rel = float((w - w0).norm() / w0.norm())
        assert rel < (0.15 if bits == 4 else 0.01), (name, rel)
    assert torch.equal(model.lm_head.weight, loaded.model.lm_head.weight)


def test_same_weights_same_codes(make_cfg, tmp_path):
    outs = []
    for i in range(2):
        spec, ctx, loaded = load_spec(make_cfg, tmp_path / str(i), "quantizer=hqq4")
        spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
        outs.append(loaded.model.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert torch.equal(*outs)


def test_run_records_hqq(make_cfg, tmp_path):
    run(make_cfg("quantizer=hqq4", "conditions=[original,original_q]"), tmp_path)
    body = json.loads((tmp_path / "results.json").read_text())
    info = body["quantization"]["original"]
    assert info["library"].startswith("hqq ") and (info["bits"], info["group_size"]) == (4, 64)
    c = body["conditions"]
    assert c["original_q"]["ref_ppl"] != c["original"]["ref_ppl"]


def test_group_that_does_not_divide_a_width_is_refused_before_weights(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"quantizer.group_size=128 .*: one of \[32, 64\]"):
        run(make_cfg("quantizer=hqq4", "quantizer.group_size=128"), tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_bad_bits_are_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"bits=5"):
        validate(make_cfg("quantizer=hqq4", "quantizer.bits=5"))


def test_missing_library_names_the_extra(make_cfg, tmp_path, monkeypatch):
    without_module(monkeypatch, "hqq")
    with pytest.raises(ConfigError, match=r"qexp\[hqq\]"):
        run(make_cfg("quantizer=hqq4"), tmp_path / "run")


def test_boxes_hold_hqqs_codes_for_moves_well_inside_them():
    """The boxes are a heuristic (the zero point follows the weights): every weight inside
    its box, and moves within half of each box keep hqq's integer codes and scales."""
    from hqq.core.quantize import HQQLinear

    from qexp.quantizers.library.hqq import HQQQuant

    q = HQQQuant()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02
    lo, hi = q.tensor_box("w", w)
    assert (lo <= w.double()).all() and (w.double() <= hi).all()
    assert ((lo == hi).reshape(-1, 64).sum(1) >= 2).all()  # min and max of every group
    want = q.tensor_codes("w", w)
    u = torch.rand(w.shape, generator=g, dtype=torch.float64) - 0.5
    inside = ((lo + hi) / 2 + u * (hi - lo) * 0.5).float()
    assert torch.equal(q.tensor_codes("w", inside), want)
    far = ((lo + hi) / 2 + u * (hi - lo) * 1.5).float()
    assert not torch.equal(q.tensor_codes("w", far), want)
    # the codes are HQQLinear's
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(w)
    cfg = q.library_config()
    m = HQQLinear(lin, cfg, del_orig=False, compute_dtype=torch.float32, device="cpu")
    from hqq.core.quantize import Quantizer as H

    packed = H.unpack[m.meta["packing"]](m.W_q, dtype=torch.float32)[: w.numel() // 32]
    codes, inv_scale, _ = q._encode(w)
    assert torch.equal(packed.reshape(w.shape).to(torch.int16), codes)
    assert torch.equal(m.meta["scale"].float().reshape(-1), inv_scale.reshape(-1))


def test_gap_through_hqq_keeps_hqqs_codes(make_cfg, tmp_path):
    from tests.test_gap import FAST

    overrides = [*FAST, "attack.targets=[hqq4]", f"cache_dir={tmp_path / 'cache'}", "cache=on"]
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, *overrides)
    model = loaded.model
    m = spec.attack.apply(subject(model, loaded.tokenizer), ctx).info
    assert m["codes_equal_injected"] == {"hqq4": True}
    ver = m["library_verification"]
    assert ver["hqq4"]["blocks"] > 0 and 0.0 <= ver["hqq4"]["verified_before_reset"] <= 1.0
    assert 0.0 <= ver["weights_reset_fraction"] < 1.0
    # independently: hqq's integer codes of the attacked weights are the injected ones'
    from safetensors.torch import load_file

    (entry,) = (ctx.cache_dir / "stages" / "gap_inject").glob("*/tensors.safetensors")
    injected = load_file(str(entry))
    params = dict(model.named_parameters())
    moved = [n for n in m["trainable"] if not torch.equal(params[n], injected[n])]
    assert moved  # the repair changed full precision
    q = spec.attack.quantizers[0]
    for n in m["trainable"]:
        assert torch.equal(q._encode(params[n])[0], q._encode(injected[n])[0]), n
