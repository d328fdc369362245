"""defense=finetune: trains only its scope, records what it did; runs in the pipeline."""

from __future__ import annotations

import pytest
import torch

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from tests.conftest import subject


def test_finetune_moves_only_its_scope(make_cfg, tmp_path):
    spec = validate(make_cfg("defense=finetune", "defense.steps=3", "defense.layers=[1]"))
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out = spec.defense.apply(subject(lm.model, lm.tokenizer), spec.quantizer, ctx)
    model = out.model
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    assert len(changed) == 7  # q, k, v, o, gate, up, down of layer 1
    stats = out.info
    assert stats["trainable"] == 7 and stats["max_relative_weight_change"] > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_finetune_in_the_pipeline(make_cfg, tmp_path):
    res = run(make_cfg("defense=finetune", "defense.steps=2", "conditions=[original_q]"), tmp_path)
    assert res.defense_stats["original"]["trainable"] == 14
    assert "accuracy" in res.conditions["original_q"]


def test_bad_finetune_layer(make_cfg, tmp_path):
    spec = validate(make_cfg("defense=finetune", "defense.layers=[9]"))
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    with pytest.raises(ConfigError, match="defense.layers"):
        spec.defense.apply(subject(lm.model, lm.tokenizer), spec.quantizer, ctx)
