"""GPTQ and AWQ through llm-compressor (the second GPTQ back-end, compressed-tensors format)."""

from __future__ import annotations

import json

import pytest
import torch

from qexp.core.errors import ConfigError
from qexp.pipeline.spec import validate
from qexp.quantizers.calib import Calibration
from tests.conftest import levels_per_group, load_spec, subject, without_module

pytest.importorskip("llmcompressor")

# widths 64 (hidden, 4 heads of 16) and 128 (MLP, q/k/v with 4 kv heads): group 32 divides all;
# one torch thread: these tests share a small machine
KV4 = ["model.num_kv_heads=4", "quantizer.group_size=32", "threads=1"]


def test_gptq_grid_kernel_check_and_compressed_artifact(make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    spec, ctx, loaded = load_spec(
        make_cfg, tmp_path, "quantizer=gptq4_llmc", "save_quantized=true", *KV4
    )
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    ids = loaded.tokenizer("Question: Tom has 3 apples.", return_tensors="pt")["input_ids"]
    out = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    model, info = out.model, out.info
    assert info["library"].startswith("llmcompressor 0.14")
    assert info["method"] == "gptq" and info["modules"] == 14  # 7 linears x 2 layers
    assert info["kernel_vs_dequant_max_rel_err"] <= spec.quantizer.kernel_tol
    assert info["calibration"] == {"source": "self", "samples": 16, "seq_len": 128}
    assert "gptq_rtn_fallback" not in info
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"):
        q = model.get_submodule(name).weight
        assert not torch.equal(q, before[name + ".weight"])
        assert levels_per_group(q, 32) <= 16
    # a plain HF model: no compressed-tensors state or patched forwards left on it
    assert set(dict(model.named_parameters())) == set(before)
    assert not any(hasattr(m, "quantization_scheme") for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())
    # GPTQ leaves the norms, embeddings and lm_head alone
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"])
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert (tmp_path / "logs" / "llmcompressor_original.log").stat().st_size > 0

    art = tmp_path / info["artifact"]
    qcfg = json.loads((art / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    assert qcfg["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert qcfg["ignore"] == ["lm_head"]
    lib = AutoModelForCausalLM.from_pretrained(str(art))  # transformers de-compresses it
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        theirs = lib(input_ids=ids).logits.float()
    rel = float((ours - theirs).norm() / theirs.norm())
    assert rel < 1e-5, rel
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_awq_runs_and_rescales_the_norms(make_cfg, tmp_path):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=awq4_llmc", *KV4)
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    out = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    model, info = out.model, out.info
    assert info["method"] == "awq" and info["modules"] == 14
    assert info["kernel_vs_dequant_max_rel_err"] <= spec.quantizer.kernel_tol
    assert levels_per_group(model.get_submodule("model.layers.1.mlp.down_proj").weight, 32) <= 16
    # AWQ folds its per-channel scales into the norms before q/k/v and gate/up
    ln = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(dict(model.named_parameters())[ln], before[ln])
    assert not any(hasattr(m, "quantization_scheme") for m in model.modules())


def test_a_group_that_splits_a_row_fails_before_calibration(make_cfg, tmp_path, monkeypatch):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=gptq4_llmc")  # group 128, width 64

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the shape check")

    monkeypatch.setattr(Calibration, "sequences", no_calibration)
    with pytest.raises(ConfigError, match=r"quantizer.group_size=128") as e:
        spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    assert "[64, 128]" in str(e.value) and "[32, 64]" in str(e.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["quantizer=gptq4_llmc", "quantizer.bits=3"], "quantizer.bits=3"),
        (["quantizer=gptq4_llmc", "quantizer.group_size=100"], "quantizer.group_size=100"),
        (["quantizer=gptq4_llmc", "quantizer.method=gguf"], "quantizer.method='gguf'"),
        (["quantizer=awq4_llmc", "quantizer.desc_act=true"], "quantizer.desc_act=True"),
        (["quantizer=gptq4_llmc", "quantizer.skip=[mlp]"], "quantizer.skip=['mlp']"),
    ],
)
def test_bad_llmc_configs_fail_before_loading(make_cfg, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert key in str(e.value)


def test_missing_library_names_the_extra(make_cfg, monkeypatch):
    without_module(monkeypatch, "llmcompressor")
    with pytest.raises(ConfigError, match=r"qexp\[llmcompressor\]"):
        validate(make_cfg("quantizer=gptq4_llmc"))


def test_w8a8_int8_smoothquant_then_gptq_is_the_library_model(make_cfg, tmp_path):
    """quantizer=w8a8_int8: SmoothQuant + GPTQ (int8 per channel) with int8 per-token
    activations; the evaluated model is the library's (its forward quantizes activations),
    its weights checked against the library's weight fake-quantization."""
    spec, ctx, loaded = load_spec(
        make_cfg, tmp_path, "quantizer=w8a8_int8", "quantizer.calibration.samples=4", *KV4[:1]
    )
    plain = {n: p.clone() for n, p in loaded.model.named_parameters()}
    out = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    info = out.info
    assert info["method"] == "gptq" and info["smoothing_strength"] == 0.8
    assert info["modules"] == 14 and info["kernel_vs_dequant_max_rel_err"] <= 0.02
    assert info["formats"] == {"int-quantized": 14}
    mod = out.model.get_submodule("model.layers.0.mlp.up_proj")
    acts = mod.quantization_scheme.input_activations
    assert acts.num_bits == 8 and acts.strategy == "token" and acts.dynamic is True
    # SmoothQuant folded its scales into the norm before gate/up
    ln = "model.layers.0.post_attention_layernorm.weight"
    assert not torch.equal(dict(out.model.named_parameters())[ln], plain[ln])
    assert not type(spec.quantizer).plain_output and type(spec.quantizer).data_dependent


@pytest.mark.parametrize(
    ("override", "key"),
    [("quantizer.group_size=32", "quantizer.group_size=32"), ("quantizer.sym=false", "sym")],
)
def test_w8a8_refuses_what_the_recipe_does_not_do(make_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        validate(make_cfg("quantizer=w8a8_int8", override))
