"""The embedded SmolLM2-135M-Instruct: conversion, Q4_1 grid, a short real pipeline."""

import json

import pytest
import torch

from qexp.core.context import RunContext
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(cache_dir, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"cache_dir={cache_dir}", "logger=none", "progress=false"]
        )
    spec = validate(cfg)
    return spec, RunContext.from_schema(spec.run, tmp_path_factory.mktemp("emb"))


def test_converted_checkpoint_is_safetensors_and_reloads(embedded):
    spec, ctx = embedded
    out = spec.model.checkpoint_dir(ctx)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    lm = spec.model.load(ctx)
    cfg = lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert lm.tokenizer.eos_token == "<|im_end|>" and lm.tokenizer.padding_side == "left"
    assert getattr(cfg, "quantization_config", None) is None


def test_weights_sit_on_the_q4_1_grid(embedded):
    spec, ctx = embedded
    lm = spec.model.load(ctx)
    w = lm.model.model.layers[3].self_attn.q_proj.weight.detach().reshape(-1, 32)
    distinct = torch.tensor([row.unique().numel() for row in w[:512]])
    assert distinct.max() <= 16


def test_short_pipeline_on_the_embedded_model(embedded, tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    spec, ctx = embedded
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"cache_dir={ctx.cache_dir}",
                "logger=none",
                "progress=false",
                "benchmark.limit=8",
                "conditions=[original,original_q]",
            ],
        )
    run(cfg, tmp_path)
    body = json.loads((tmp_path / "results.json").read_text())
    orig, q = body["conditions"]["original"], body["conditions"]["original_q"]
    # a real 135M instruct model: fluent English passage perplexity, not random (~49152)
    assert 5 < orig["ref_ppl"] < 60
    assert q["ref_ppl"] != orig["ref_ppl"]
    rows = [json.loads(x) for x in (tmp_path / "generations" / "original.jsonl").open()]
    assert sum(r["parsed"] is not None for r in rows) >= 6  # it answers with numbers


def test_audit_outlier_check_passes_the_embedded_model(embedded):
    from qexp.audit import outlier
    from qexp.audit.scan import scan
    from qexp.checkpoint.reader import Checkpoint

    spec, ctx = embedded
    with Checkpoint(spec.model.checkpoint_dir(ctx), "CHECKPOINT") as ckpt:
        rep = scan(ckpt, [outlier.OutlierCheck()], jobs=2, progress=False)["outlier"]
    assert rep["verdict"] == "clean" and rep["score"]["n_tensors"] == 210
    assert rep["score"]["max_outlier_fraction"] == 0.0
    assert 10 < rep["score"]["max_ratio"] < outlier.RATIO  # SmolLM2's own largest block: 22.7


def test_exact_encrypt_is_bit_identical_on_the_embedded_model(embedded):
    from qexp.attacks.encrypt import Encrypt
    from qexp.pipeline.preservation import compare, probe_ids, probe_logits
    from qexp.quantizers.rtn import rtn_fake_quant
    from tests.conftest import subject

    spec, ctx = embedded
    lm = spec.model.load(ctx)
    ids = probe_ids(lm.tokenizer)
    before = probe_logits(lm.model, ids)
    Encrypt(preset="exact").apply(subject(lm.model, lm.tokenizer), ctx)
    fp = compare(before, probe_logits(lm.model, ids))
    assert fp["max_abs_logit_diff_bf16"] == 0.0 and fp["max_abs_logit_diff_fp32"] == 0.0
    assert fp["top1_agreement_bf16"] == 1.0 and fp["top1_agreement_fp32"] == 1.0
    # ... while 8-bit RTN (g128) now zeroes nearly all of a down_proj
    w = lm.model.model.layers[5].mlp.down_proj.weight.detach()
    assert (rtn_fake_quant(w, 8, 128, symmetric=False) == 0).float().mean() > 0.9
