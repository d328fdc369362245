"""GPTQ, AWQ and GGUF k-quants through GPTQModel, and the calibration sources."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qexp.core.errors import ConfigError
from qexp.pipeline.spec import validate
from qexp.quantizers.calib import Calibration, sample_from_model
from tests.conftest import levels_per_group, load_spec, subject

pytest.importorskip("gptqmodel")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# AWQ's clip search needs output widths that are multiples of 64: 4 kv heads of 16
KV4 = ["model.num_kv_heads=4", "quantizer.group_size=32"]


@pytest.mark.parametrize("name,bits", [("gptq4", 4), ("gptq8", 8)])
def test_gptq_writes_a_grid_the_library_kernel_agrees_with(make_cfg, tmp_path, name, bits):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, f"quantizer={name}", *KV4)
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    out = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    model, info = out.model, out.info
    assert info["method"] == "gptq" and info["modules"] == 14  # 7 linears x 2 layers
    assert info["kernel_vs_dequant_max_rel_err"] <= spec.quantizer.kernel_tol
    assert info["calibration"] == {"source": "self", "samples": 16, "seq_len": 128}
    q = model.get_submodule("model.layers.0.mlp.up_proj").weight
    assert not torch.equal(q, before["model.layers.0.mlp.up_proj.weight"])
    assert levels_per_group(q, 32) <= 2**bits
    # lm_head/embeddings and norms are untouched by GPTQ
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"])
    assert (tmp_path / "logs" / "gptqmodel_original.log").stat().st_size > 0


def test_awq_artifact_reloads_and_matches_the_evaluated_model(make_cfg, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=awq4", "save_quantized=true", *KV4)
    ids = loaded.tokenizer("Question: Tom has 3 apples.", return_tensors="pt")["input_ids"]
    out = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    model, art = out.model, tmp_path / out.info["artifact"]
    assert json.loads((art / "quantize_config.json").read_text())["quant_method"] == "awq"
    lib = GPTQModel.load(str(art), device="cpu", backend=BACKEND.AWQ_TORCH)
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        theirs = lib.model(input_ids=ids).logits.float()
    rel = float((ours - theirs).norm() / theirs.norm())
    assert rel < 0.02, rel
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_gguf_k_quant_through_gptqmodel(make_cfg, tmp_path):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=gptqmodel_q4_k_m")
    before = loaded.model.get_submodule("model.layers.1.mlp.down_proj").weight.clone()
    out = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer), ctx)
    model = out.model
    assert out.info["method"] == "gguf"
    after = model.get_submodule("model.layers.1.mlp.down_proj").weight
    assert not torch.equal(after, before)
    assert levels_per_group(after, 32) <= 16  # Q4_K: 4-bit codes per 32-weight sub-block


def test_calibration_self_is_seeded_and_exact_length(make_cfg, tmp_path):
    _, _, loaded = load_spec(make_cfg, tmp_path)
    a = sample_from_model(loaded.model, loaded.tokenizer, 3, 20, seed=1)
    b = sample_from_model(loaded.model, loaded.tokenizer, 3, 20, seed=1)
    c = sample_from_model(loaded.model, loaded.tokenizer, 3, 20, seed=2)
    assert a == b and a != c
    assert [len(s) for s in a] == [20, 20, 20]
    special = set(loaded.tokenizer.all_special_ids)
    assert not special & {t for s in a for t in s}


def test_calibration_files(make_cfg, tmp_path):
    _, _, loaded = load_spec(make_cfg, tmp_path)
    tok = loaded.tokenizer
    txt = tmp_path / "c.txt"
    txt.write_text("Seven apples and three pears are in a basket. " * 40)
    seqs = Calibration("file", str(txt), samples=4, seq_len=16).sequences(None, tok, 0)
    ids = tok(txt.read_text(), add_special_tokens=False)["input_ids"]
    assert seqs == [ids[i * 16 : (i + 1) * 16] for i in range(4)]
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        "\n".join(json.dumps({"text": "Some calibration text here. " * 10}) for _ in range(5))
    )
    assert len(Calibration("file", str(jl), samples=5, seq_len=8).sequences(None, tok, 0)) == 5
    with pytest.raises(ConfigError, match="quantizer.calibration.samples=99"):
        Calibration("file", str(jl), samples=99, seq_len=64).sequences(None, tok, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        Calibration("file", str(bad), samples=1, seq_len=8).sequences(None, tok, 0)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["quantizer=gptq4", "quantizer.bits=5"], "quantizer.bits=5"),
        (["quantizer=gptq4", "quantizer.group_size=100"], "quantizer.group_size=100"),
        (
            ["quantizer=gptq4", "quantizer.calibration.source=wiki"],
            "quantizer.calibration.source='wiki'",
        ),
        (
            ["quantizer=gptq4", "quantizer.calibration.source=file"],
            "quantizer.calibration.path=None",
        ),
        (
            ["quantizer=gptq4", "quantizer.calibration.source=dataset"],
            "quantizer.calibration.dataset=None",
        ),
        (["quantizer=gptq4", "quantizer.calibration.samples=0"], "quantizer.calibration.samples=0"),
        (["quantizer=gptqmodel_q4_k_m", "quantizer.gguf_type=q3_k"], "quantizer.gguf_type='q3_k'"),
        (["quantizer=rtn4", "save_quantized=true"], "save_quantized=True"),
    ],
)
def test_bad_quantizer_configs_fail_before_loading(make_cfg, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert key in str(e.value)


def test_awq_refuses_a_group_that_splits_a_row():
    from qexp.quantizers.library.gptqmodel import GPTQModelQuant

    q = GPTQModelQuant(name="awq4", method="awq", group_size=128)
    with pytest.raises(
        ConfigError, match=r"group_size=128 .*\[576, 1536\] for AWQ: one of \[32, 64\] or -1"
    ):
        q.check_widths([576, 1536])
    GPTQModelQuant(name="gptq4", method="gptq", group_size=128).check_widths([576, 1536])  # pads
