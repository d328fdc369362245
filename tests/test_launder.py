"""defense=launder: the round trip through `via`, what it changes, validation, pipeline."""

import importlib.util
import json

import pytest
import torch
from torch import nn

from qexp.core.errors import ConfigError
from qexp.defenses.launder import Launder
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from qexp.quantizers.base import NoQuantizer, grid_options
from qexp.quantizers.gguf import gguf_fake_quant
from qexp.quantizers.rtn import RTN, rtn_fake_quant
from tests.conftest import plain_ctx, subject

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
VIAS = grid_options()


def ctx_for(tmp_path):
    return plain_ctx(tmp_path)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.up = nn.Linear(64, 128, bias=True)
    m.norm = nn.LayerNorm(128)
    m.down = nn.Linear(128, 64, bias=False)
    m.lm_head = nn.Linear(64, 96, bias=False)
    return m


def reference_round_trip(via: str, w: torch.Tensor) -> torch.Tensor:
    """The library's own quantize + de-quantize, called directly."""
    if via.startswith("rtn"):
        bits, group = {"rtn4": (4, 128), "rtn8": (8, 128), "rtn8_g64": (8, 64)}[via]
        return rtn_fake_quant(w, bits, group, False)
    if via.startswith("gguf_"):
        return gguf_fake_quant(w, via.removeprefix("gguf_"))
    if not via.startswith("bnb_"):  # compressed-tensors: the option's round trip is checked
        # against llm-compressor's oneshot in tests/test_compressed_formats.py; here the
        # wiring (which tensors, nothing else) is what is tested
        from qexp.core.registry import build_option

        return build_option("quantizer", via, "via").fake_quant(w)
    import bitsandbytes.functional as F

    mode = via.removeprefix("bnb_")
    if mode == "int8":  # bitsandbytes' Int8Params quantizes float16, whatever the dtype
        q, s, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return q.float() * s[:, None] / 127
    packed, state = F.quantize_4bit(w.clone(), blocksize=64, quant_type=mode)
    return F.dequantize_4bit(packed, state)


def launder(**kw) -> Launder:
    """defense=launder built by hand, its `via` quantizer resolved as validation does."""
    d = Launder(**kw)
    d.resolve(None)
    return d


@pytest.mark.parametrize("via", [v for v in VIAS if HAS_BNB or not v.startswith("bnb_")])
def test_round_trip_through_via_on_the_quantized_linears_only(tmp_path, via):
    model = small_model()
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    d = launder(via=via)
    quantizer = RTN(name="rtn4", bits=4, group_size=32)  # skip: lm_head
    st = d.apply(subject(model), quantizer, ctx_for(tmp_path)).info
    after = model.state_dict()
    for k in ("up.weight", "down.weight"):
        expect = reference_round_trip(via, clean[k])
        assert torch.allclose(after[k], expect, rtol=0, atol=1e-7), k
        assert not torch.equal(after[k], clean[k])
    for k in ("up.bias", "norm.weight", "norm.bias", "lm_head.weight"):
        assert torch.equal(after[k], clean[k]), k
    assert st["via"] == via and st["quantizer"] == "rtn4" and st["n_tensors"] == 2
    assert set(st["tensors"]) == {"up.weight", "down.weight"}
    assert st["n_params"] == 64 * 128 * 2 and st["max_abs_change"] > 0
    assert 0 < st["rel_change"] < 0.5
    assert st["fraction_changed_method"] == "library"
    assert 0 <= st["fraction_changed"] <= 1 and "theory_uniform" not in st


def test_laundering_moves_int8_codes_but_not_rtn8_values_much(tmp_path):
    """rtn8 g64 -> its grid is about as fine as LLM.int8's row grid: codes move, values barely."""
    if not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    from qexp.quantizers.bnb import BitsAndBytes

    model = small_model()
    d = launder(via="rtn8_g64")
    st = d.apply(subject(model), BitsAndBytes(name="bnb_int8", mode="int8"), ctx_for(tmp_path)).info
    assert st["rel_change"] < 0.01
    assert 0.05 < st["fraction_changed"] < 0.6


def test_launder_without_a_grid_quantizer_records_no_fractions(tmp_path):
    model = small_model()
    d = launder(via="gguf_q8_0")
    st = d.apply(subject(model), NoQuantizer(), ctx_for(tmp_path)).info
    assert st["n_tensors"] == 2 and "fraction_changed" not in st  # lm_head skipped by default


def test_a_round_trip_through_the_configured_quantizer_is_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(
            make_cfg("defense=launder", "quantizer=rtn8", "defense.via_args={group_size: 128}")
        )
    assert e.value.key == "defense.via"
    with pytest.raises(ConfigError) as e:  # the same operation under another option name
        validate(make_cfg("defense=launder", "quantizer=rtn8", "defense.via=rtn8"))
    assert e.value.key == "defense.via"
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("defense=launder", "defense.via=gguf_q4_0", "quantizer=gguf_q4_0"))
    assert e.value.key == "defense.via"
    d = launder(via="rtn4")
    with pytest.raises(ConfigError, match="defense.via"):  # also at apply time
        d.apply(subject(small_model()), RTN(name="rtn4"), ctx_for(tmp_path))
    # a different group size is a different round trip
    validate(make_cfg("defense=launder", "quantizer=rtn8", "defense.via_args={group_size: 32}"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("defense.via=gptq4", "defense.via"),
        ("defense.via=rtn5", "defense.via"),
        ("defense.via_args={bits: 7}", "defense.via_args.bits"),
        ("defense.via_args={group_size: 1}", "defense.via_args.group_size"),
        ("defense.via_args={kappa: 1}", "defense.via_args.kappa"),
    ],
)
def test_bad_launder_values_name_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("defense=launder", override))
    assert e.value.key == key


def test_gguf_via_needs_whole_blocks(tmp_path):
    m = nn.Module()
    m.proj = nn.Linear(40, 8, bias=False)
    with pytest.raises(ValueError, match="multiple of the GGUF block size 32"):
        launder(via="gguf_q8_0").apply(subject(m), NoQuantizer(), ctx_for(tmp_path))


def test_launder_pipeline(make_cfg, tmp_path):
    quantizer = "bnb_int8" if HAS_BNB else "gguf_q8_0"
    cfg = make_cfg(
        "defense=launder",
        f"quantizer={quantizer}",
        "conditions=[original,original_q]",
        "benchmark.limit=2",
        "similarity.enabled=false",
    )
    run(cfg, tmp_path)
    body = json.loads((tmp_path / "results.json").read_text())
    assert body["status"] == "complete"
    st = body["defense_stats"]["original"]
    assert st["via"] == "rtn8_g64" and st["via_config"]["bits"] == 8
    assert st["via_config"]["group_size"] == 64
    assert st["quantizer"] == quantizer and st["n_tensors"] == 14
    assert 0 < st["fraction_changed"] < 1 and st["fraction_changed_method"] == "library"
    assert body["conditions"]["original_q"]["ref_ppl"] > 1
