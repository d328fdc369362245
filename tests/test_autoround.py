"""AutoRound through auto-round: tuned weights, its own format reloaded, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from tests.conftest import levels_per_group, load_spec, subject, without_module

pytest.importorskip("auto_round")

FAST = ["quantizer.iters=4", "quantizer.calibration.samples=4", "quantizer.calibration.seq_len=32"]


def test_tuned_weights_are_symmetric_groups_and_the_saved_artifact_loads_as_evaluated(
    make_cfg, tmp_path
):
    outs = []
    for i in range(2):  # the second time with save_quantized=true
        spec, ctx, loaded = load_spec(make_cfg, tmp_path / str(i), "quantizer=autoround4", *FAST)
        ctx = dataclasses.replace(ctx, save_quantized=bool(i))
        model, q = loaded.model, spec.quantizer
        before = {n: m.weight.detach().clone() for n, m in q.quantized_linears(model)}
        lm_head = model.lm_head.weight.detach().clone()
        res = q.quantize(subject(model, loaded.tokenizer), ctx)
        outs.append({n: m.weight.detach().clone() for n, m in q.quantized_linears(model)})
    info = res.info
    assert info["library"] == "auto-round 0.15.1" and info["modules"] == len(before) == 14
    assert info["kernel"].endswith("QuantLinear") and info["format"] == "auto_round"
    assert 0 < info["kernel_vs_dequant_max_rel_err"] <= q.kernel_tol  # float16 kernel on CPU
    assert info["calibration"] == {"source": "self", "samples": 4, "seq_len": 32}
    assert (tmp_path / "1" / "logs" / "autoround_original.log").stat().st_size > 0
    for name, w in outs[1].items():
        assert torch.equal(w, outs[0][name]), name  # same weights, data and seed: same codes
        assert levels_per_group(w, 64) <= 16, name  # 4 bits per group of 64
        rel = float((w - before[name]).norm() / before[name].norm())
        assert 0.01 < rel < 0.2, (name, rel)
    assert torch.equal(model.lm_head.weight, lm_head)
    # the artifact, in AutoRound's format, loaded the user's way (transformers' AutoRound
    # integration, its CPU kernel), computes what qexp evaluates, up to float16
    assert info["artifact"] == "quantized/original"
    out = tmp_path / "1" / info["artifact"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    got = (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"])
    assert got == ("auto-round", 4, 64, True)
    user = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        ref, got = model(ids).logits, user(ids).logits.float()
    assert float((got - ref).norm() / ref.norm()) < 5e-3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("quantizer.sym=false", r"quantizer.sym=False .*symmetric|asymmetric"),
        ("quantizer.bits=5", r"quantizer.bits=5"),
        ("quantizer.iters=0", r"quantizer.iters=0"),
        ("quantizer.skip=[]", r"quantizer.skip=\[\]"),
    ],
)
def test_bad_settings_are_refused(make_cfg, override, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(make_cfg("quantizer=autoround4", override))


def test_group_that_does_not_divide_a_width_is_refused_before_weights(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"quantizer.group_size=128 .*AutoRound"):
        run(make_cfg("quantizer=autoround4", "quantizer.group_size=128"), tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_missing_library_names_the_extra(make_cfg, tmp_path, monkeypatch):
    without_module(monkeypatch, "auto_round")
    with pytest.raises(ConfigError, match=r"qexp\[autoround\]"):
        run(make_cfg("quantizer=autoround4"), tmp_path / "run")


def test_eight_bit_weights_have_at_most_256_levels_per_group(make_cfg, tmp_path):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=autoround8", *FAST)
    model, q = loaded.model, spec.quantizer
    before = {n: m.weight.detach().clone() for n, m in q.quantized_linears(model)}
    res = q.quantize(subject(model, loaded.tokenizer), ctx)
    assert res.info["bits"] == 8 and res.info["kernel_vs_dequant_max_rel_err"] <= q.kernel_tol
    for name, m in q.quantized_linears(model):
        w = m.weight.detach()
        assert 16 < levels_per_group(w, 64) <= 256, name
        rel = float((w - before[name]).norm() / before[name].norm())
        assert 0 < rel < 0.02, (name, rel)  # 8 bits: far closer than 4
