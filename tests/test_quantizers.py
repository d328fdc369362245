"""bitsandbytes and GGUF quantizers in the pipeline, on the real libraries."""

import copy

import pytest
import torch

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from qexp.quantizers.bnb import BitsAndBytes
from qexp.quantizers.gguf import GGUFQuant, gguf_fake_quant
from tests.conftest import CONF, subject

pytest.importorskip("bitsandbytes")
QUANTIZERS = sorted(
    p.stem for p in (CONF / "quantizer").glob("*.yaml") if p.stem.startswith(("bnb_", "gguf_"))
)


@pytest.mark.parametrize("q", QUANTIZERS)
def test_quantizer_in_the_pipeline(make_cfg, tmp_path, q):
    res = run(make_cfg(f"quantizer={q}", "conditions=[original,original_q]"), tmp_path)
    a, b = res.conditions["original"], res.conditions["original_q"]
    assert b["n_items"] == 4 and b["ref_ppl"] != a["ref_ppl"]


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_bnb_4bit_model_holds_the_library_codes(make_cfg, tmp_path, mode):
    import bitsandbytes.functional as F

    spec = validate(make_cfg())
    ctx = RunContext.from_schema(spec.run, tmp_path)
    model = spec.model.load(ctx).model
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    q = BitsAndBytes(name=f"bnb_{mode}", mode=mode).quantize(subject(copy.deepcopy(model)), ctx)
    q = q.model
    lin = q.model.layers[0].self_attn.q_proj
    assert type(lin).__name__ == "Linear4bit"
    got = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)  # before any forward
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type=mode)
    assert torch.equal(got.float(), F.dequantize_4bit(packed, st).float())
    # every weight sits inside its own preserving interval
    lo, hi = BitsAndBytes(mode=mode).intervals(w)
    assert ((lo <= w.double()) & (w.double() <= hi)).all()


def test_bnb_int8_uses_the_library_module(make_cfg, tmp_path):
    spec = validate(make_cfg())
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    q = BitsAndBytes(name="bnb_int8", mode="int8").quantize(subject(lm.model), ctx).model
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert type(q.lm_head).__name__ == "Linear"  # skipped


def test_gguf_fake_quant_levels():
    w = torch.randn(8, 64)
    for qtype, levels in (("q4_0", 16), ("q5_1", 32), ("q8_0", 255)):
        d = gguf_fake_quant(w, qtype).reshape(-1, 32)
        assert max(len(torch.unique(row)) for row in d) <= levels
        assert not torch.equal(d.reshape(8, 64), w)


def test_bad_quantizer_values():
    with pytest.raises(ConfigError, match="mode"):
        BitsAndBytes(mode="int4")
    with pytest.raises(ConfigError, match="qtype"):
        GGUFQuant(qtype="q4_k_m")
