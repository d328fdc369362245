"""Rotated deployments (quantizer=quip_w4a16|quip_nvfp4a16|spinquant_w4a16): llm-compressor's
rotation + weight-only recipes, evaluated as the library's model, the rotation measured."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qexp.core.errors import ConfigError
from qexp.core.oneshot import ignored_linears, run_oneshot
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from qexp.quantizers.library.rotated import RotatedScheme, RotationDriftError
from tests.conftest import plain_ctx, subject

pytest.importorskip("llmcompressor")
TINY_BLOCK = "quantizer.block_size=16"  # tiny Llama's k/v outputs are 32 wide


def quantized(make_cfg, tmp_path, option: str, *extra: str):
    spec = validate(make_cfg(f"quantizer={option}", TINY_BLOCK, *extra))
    ctx = plain_ctx(tmp_path)
    lm = spec.model.load(ctx)
    out = spec.quantizer.quantize(subject(copy.deepcopy(lm.model), lm.tokenizer), ctx)
    return spec.quantizer, lm, out, ctx


def library_logits(q: RotatedScheme, lm, ctx, ids: torch.Tensor) -> torch.Tensor:
    """The library's own model: the recipe through oneshot, weights fake-quantized on every
    forward (not read back)."""
    lib = copy.deepcopy(lm.model)
    ignore = ignored_linears(lib, q.quantized_linears(lib))
    run_oneshot(lib, ctx.cache_dir, tokenizer=lm.tokenizer, recipe=q.recipe(ignore))
    with torch.no_grad():
        return lib(ids).logits


@pytest.mark.parametrize("option,tol", [("quip_w4a16", 0.0), ("quip_nvfp4a16", 5e-3)])
def test_quip_recipe_is_the_librarys_model(make_cfg, tmp_path, option, tol):
    """The evaluated model (read-back weights, online V/U hooks) computes what the library's
    own model computes (NVFP4: up to its bfloat16 de-quantization); the rotation alone is
    exact to fp32 rounding and recorded."""
    q, lm, out, ctx = quantized(make_cfg, tmp_path, option)
    rot = out.info["rotation"]
    assert rot["rotations"] == ["v", "u"] and rot["max_abs_logit_diff_fp32"] < 1e-5
    assert out.info["modules"] == 14 and out.info["kernel_vs_dequant_max_rel_err"] <= q.kernel_tol
    ids = torch.arange(1, 33).reshape(1, -1)
    with torch.no_grad():
        ours, full = out.model(ids).logits, lm.model(ids).logits
    lib = library_logits(q, lm, ctx, ids)
    assert float((ours - lib).norm() / lib.norm()) <= tol
    assert float((ours - full).norm() / full.norm()) > 1e-3  # it is quantized
    hooked = [m for m in out.model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooked  # the online rotations stayed


def test_spinquant_centring_stops_the_run_unless_allowed(make_cfg, tmp_path):
    """The library's SpinQuant centres the embedding rows (exact for LayerNorm only): on
    tiny Llama (RMSNorm) the rotation alone moves the logits and the run stops."""
    with pytest.raises(RotationDriftError, match="rotation_tolerance"):
        quantized(make_cfg, tmp_path, "spinquant_w4a16")
    _, _, out, _ = quantized(
        make_cfg, tmp_path, "spinquant_w4a16", "quantizer.rotation_tolerance=10"
    )
    assert out.info["rotation"]["max_abs_logit_diff_fp32"] > 0.05


def test_pipeline_records_the_rotation(make_cfg, tmp_path):
    run(make_cfg("quantizer=quip_w4a16", TINY_BLOCK), tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "complete"
    q = res["quantization"]["original"]
    assert q["rotation"]["method"] == "quip" and q["formats"] == {"pack-quantized": 14}
    assert q["weights"]["group_size"] == 64


def test_refusals_name_the_key(make_cfg, tmp_path):
    with pytest.raises(ConfigError) as e:
        RotatedScheme(name="x", scheme="NVFP4A16", group_size=64)
    assert e.value.key == "group_size"
    with pytest.raises(ConfigError) as e:
        RotatedScheme(name="x", method="spinquant", rotations=["v"])
    assert e.value.key == "rotations"
    with pytest.raises(ConfigError) as e:  # 64 does not divide tiny Llama's k/v width 32
        run(make_cfg("quantizer=quip_w4a16"), tmp_path / "bad")
    assert e.value.key == "quantizer.block_size"
