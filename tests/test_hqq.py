"""HQQ through the hqq package: the library's encoding, its forward checked, errors."""

from __future__ import annotations

import json

import pytest
import torch

from qexp.config import validate
from qexp.errors import ConfigError
from qexp.run import run
from tests.conftest import levels_per_group, load_spec, subject

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
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "hqq" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"qexp\[hqq\]"):
        run(make_cfg("quantizer=hqq4"), tmp_path / "run")
