"""defense=quantguard: the stock quantizer reproduces the learned rounding exactly."""

from __future__ import annotations

import pytest
import torch

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.pipeline.spec import validate
from qexp.quantizers.base import target_linears
from tests.conftest import subject

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantizer", ["bnb_int8", "bnb_nf4", "bnb_fp4", "rtn4"])
def test_stock_quantizer_gives_the_learned_codes(make_cfg, tmp_path, quantizer):
    over = ["defense=quantguard", "defense.steps=15", "defense.lambda_rev=0.5"]
    over += [f"quantizer={quantizer}"]
    if quantizer == "rtn4":
        over.append("quantizer.group_size=32")
    spec = validate(make_cfg(*over))
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    q = spec.quantizer
    before = {n: m.weight.detach().clone() for n, m in target_linears(lm.model, q.skip)}
    out = spec.defense.apply(subject(lm.model, lm.tokenizer), q, ctx)
    model, stats = out.model, out.info
    assert 0 < stats["flipped_fraction"] < 0.5
    total_flips = 0
    for n, m in target_linears(model, q.skip):
        w0, w1 = before[n], m.weight.detach()
        deq0, deq1 = q.fake_quant(w0), q.fake_quant(w1)
        changed = deq1 != deq0
        total_flips += int(changed.sum())
        # every changed code is a neighbouring grid point of the original weight's
        down, up = q.neighbours(w0)
        assert ((deq1 == up) | (deq1 == down))[changed].all()
        # unchanged codes: the weight itself was not moved; changed ones sit on the grid
        assert torch.equal(w1[~changed], w0[~changed])
        assert torch.equal(w1[changed], deq1[changed])
        # the real library's own codes match the learned choice
        assert torch.equal(q.codes(w1), q.codes(torch.where(changed, deq1, w0)))
    assert total_flips > 0
    assert stats["kl_fp_vs_quantized_learned_rounding"] >= 0


def test_quantguard_needs_a_grid_quantizer(make_cfg):
    with pytest.raises(ConfigError, match="quantizer='gguf_q4_0'.*rtn4"):
        validate(make_cfg("defense=quantguard", "quantizer=gguf_q4_0"))
