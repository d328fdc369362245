"""The serving formats through llm-compressor (quantizer=fp8|fp8_block|nvfp4a16|nvfp4|mxfp4a16|
mxfp4|w8a8_int8): the interval geometry against what `oneshot` + compressed-tensors' compressor
store for the embedded model's first and last layers in float32 and bfloat16, the
compressed-tensors checkpoint reloaded through transformers, the library's forward."""

from __future__ import annotations

import copy
import dataclasses
import tempfile

import pytest
import torch

from qexp.core.errors import ConfigError
from qexp.quantizers.intervals import lattice_step, signed_zero
from qexp.quantizers.library.compressed import (
    CompressedActivations,
    CompressedFormat,
    fused_absmax,
    per_element,
    weight_args,
)
from tests.conftest import embedded_first_last, plain_ctx, subject

pytest.importorskip("llmcompressor")
pytestmark = pytest.mark.slow
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRIDS = ("fp8", "fp8_block", "nvfp4a16", "mxfp4a16", "mxfp8a16")


def option(fmt: str) -> CompressedFormat:
    cls = CompressedFormat if fmt.endswith("a16") else CompressedActivations
    return cls(name=fmt, format=fmt, kernel_tol=0.005)


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory, cache_dir):
    """The embedded model cut to its first and last decoder layers, 512 vocabulary rows; its
    config saved where `name_or_path` points (compressed-tensors' save reads it there)."""
    lm = embedded_first_last(cache_dir, tmp_path_factory.mktemp("load"))
    lm.model.resize_token_embeddings(512)
    cfg = tmp_path_factory.mktemp("config")
    lm.model.config.save_pretrained(cfg)
    lm.model.config.name_or_path = str(cfg)
    return lm


def linears(model) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]


def through_oneshot(model, q: CompressedFormat) -> dict[str, torch.Tensor]:
    """What llm-compressor's oneshot + compressed-tensors' compressor store per linear, in
    the layout of `CompressedFormat.codes` (sorted keys; 1-byte tensors as their bits)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils import get_direct_state_dict

    from qexp.core.oneshot import run_oneshot
    from qexp.quantizers.library.oneshot import module_format, stored_bytes

    m = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        run_oneshot(m, Path(tmp), recipe=q.recipe(["lm_head"]))
    out = {}
    for name, mod in m.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        comp = BaseCompressor.get_value_from_registry(module_format(mod))
        out[name] = stored_bytes(comp.compress(get_direct_state_dict(mod), scheme))
    return out


@pytest.mark.parametrize("fmt", GRIDS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_boxes_keep_what_the_library_stores(two_layers, fmt, dtype):
    """qexp's codes are the bytes oneshot stores; every weight of both layers moved at once
    to a random point of its box (edges included) keeps every stored byte; one lattice step
    past a box edge changes the weight's code."""
    dt = DTYPES[dtype]
    q = option(fmt)
    model = copy.deepcopy(two_layers.model).to(dt)
    boxes = q.prepare(subject(model), None)
    clean = through_oneshot(model, q)
    names = linears(model)
    assert set(clean) == set(names) and len(names) == 14
    g = torch.Generator().manual_seed(0)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight.detach()
            assert torch.equal(boxes.tensor_codes(name + ".weight", w), clean[name]), name
            lo, hi = boxes.tensor_box(name + ".weight", w)
            assert ((lo <= w.double()) & (w.double() <= hi)).all(), name
            u = torch.rand(w.shape, generator=g, dtype=torch.float64)
            u = torch.where(u < 0.05, 0.0, torch.where(u > 0.95, 1.0, u))
            v = (lo + (hi - lo) * u).to(dt)
            v = torch.where(v.double() < lo, lattice_step(v, 1), v)
            v = torch.where(v.double() > hi, lattice_step(v, -1), v)
            assert (v != w).float().mean() > 0.5, name  # really moved
            moved.get_submodule(name).weight.copy_(v)
            past_an_edge_changes_the_code(q, boxes.absmax.get(name + ".weight"), w, lo, hi, g)
    after = through_oneshot(moved, q)
    for name in names:
        assert torch.equal(after[name], clean[name]), (fmt, dtype, name)


def past_an_edge_changes_the_code(q, gmax, w, lo, hi, gen) -> None:
    """One weight per row (a random one whose upper edge is below the block absmax), moved
    one representable step above its box: its element code changes, scales unchanged."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    p = q.params(w, gmax)
    amax = per_element(p.amax, w.shape, q.args).double()
    ok = (hi < amax) & (lo < hi)
    score = torch.rand(w.shape, generator=gen) * ok
    col = score.argmax(1)
    rows = torch.arange(w.shape[0])[ok[torch.arange(w.shape[0]), col]]
    col = col[rows]
    v = w.clone()
    v[rows, col] = lattice_step(hi[rows, col].to(w.dtype), 1)
    assert torch.equal(q.params(v, gmax).scale, p.scale)

    def codes(x):
        return signed_zero(quantize(x, p.scale, p.zero_point, q.args, global_scale=p.global_scale))

    assert len(rows) > w.shape[0] // 2
    assert (codes(v)[rows, col] != codes(w)[rows, col]).all()


def test_presets_share_weights_with_their_activation_variants():
    """nvfp4 / mxfp4 / mxfp8 quantize weights exactly as nvfp4a16 / mxfp4a16 / mxfp8a16, and
    fp8a16 is fp8's checkpoint (the same geometry)."""
    assert weight_args("nvfp4") == weight_args("nvfp4a16")
    assert weight_args("mxfp4") == weight_args("mxfp4a16")
    assert weight_args("mxfp8") == weight_args("mxfp8a16")
    assert weight_args("fp8a16") == weight_args("fp8")


SCHEMES = {
    "nvfp4a16": "NVFP4A16",
    "fp8": "FP8_DYNAMIC",
    "fp8a16": "FP8_DYNAMIC",
    "mxfp8a16": "MXFP8A16",
}


@pytest.mark.parametrize("fmt", sorted(SCHEMES))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_saved_checkpoint_reloads_with_the_evaluated_weights(two_layers, tmp_path, fmt, dtype):
    """save_quantized=true writes compressed-tensors; transformers reloads it (de-compressed)
    with exactly the weights qexp evaluated."""
    import transformers
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    dt = DTYPES[dtype]
    q = option(fmt)
    ctx = dataclasses.replace(plain_ctx(tmp_path), dtype=dt, save_quantized=True)
    model = copy.deepcopy(two_layers.model).to(dt)
    res = q.quantize(subject(model, two_layers.tokenizer), ctx)
    assert res.info["scheme"] == SCHEMES[fmt]
    assert res.info["modules"] == 14 and sum(res.info["formats"].values()) == 14
    config = transformers.CompressedTensorsConfig(run_compressed=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / res.info["artifact"], dtype=dt, quantization_config=config
    )
    for name in linears(model):
        mod = res.model.get_submodule(name)
        if q.plain_output:
            evaluated = mod.weight.detach()
        else:  # the library's model: its forward fake-quantizes the stored weight
            evaluated = forward_quantize(
                mod, mod.weight.data, "weight", mod.quantization_scheme.weights
            )
        reloaded = loaded.get_submodule(name).weight.detach()
        assert torch.equal(reloaded.float(), evaluated.float()), name


def test_activation_formats_run_the_library_forward(two_layers, tmp_path):
    """fp8 is evaluated as the library's model: its outputs differ from the plain model
    with the same de-quantized weights by the activation quantization, and the plain model
    of nvfp4a16 is a transformers model without library wrappers."""
    ctx = plain_ctx(tmp_path)
    ids = torch.arange(1, 33).reshape(1, -1)
    fp8 = option("fp8").quantize(
        subject(copy.deepcopy(two_layers.model), two_layers.tokenizer), ctx
    )
    assert not CompressedActivations.plain_output
    plain = copy.deepcopy(two_layers.model)
    with torch.no_grad():
        for name in linears(plain):
            plain.get_submodule(name).weight.copy_(
                option("fp8").fake_quant(plain.get_submodule(name).weight)
            )
        ours = fp8.model(ids, use_cache=False).logits
        same_weights = plain(ids, use_cache=False).logits
    rel = float((ours - same_weights).norm() / same_weights.norm())
    assert 1e-4 < rel < 0.2  # the FP8 activations, nothing else (first + last layer only)
    # the weights were fake-quantized once (read back); the library re-quantizing them on
    # every forward from the full-precision weights gives the same logits
    from compressed_tensors.quantization import QuantizationStatus

    with torch.no_grad():
        for name in linears(plain):
            mod = fp8.model.get_submodule(name)
            assert mod.quantization_status == QuantizationStatus.COMPRESSED
            mod.weight.copy_(two_layers.model.get_submodule(name).weight)
            mod.quantization_status = QuantizationStatus.FROZEN
        assert torch.equal(fp8.model(ids, use_cache=False).logits, ours)
    nv = option("nvfp4a16").quantize(
        subject(copy.deepcopy(two_layers.model), two_layers.tokenizer), ctx
    )
    assert not any(hasattr(m, "quantization_scheme") for m in nv.model.modules())
    # fp8a16: the same FP8 checkpoint as vLLM's FP8 Marlin runs it, 16-bit activations
    a16 = option("fp8a16").quantize(
        subject(copy.deepcopy(two_layers.model), two_layers.tokenizer), ctx
    )
    assert not any(hasattr(m, "quantization_scheme") for m in a16.model.modules())
    assert a16.info["input_activations"] == fp8.info["input_activations"] is not None
    assert "Marlin" in a16.info["evaluated_as"] and "evaluated_as" not in fp8.info
    with torch.no_grad():
        assert torch.equal(a16.model(ids, use_cache=False).logits, same_weights)


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="format"):
        CompressedFormat(name="x", format="fp8")  # fp8 quantizes activations
    with pytest.raises(ConfigError, match="format"):
        CompressedActivations(name="x", format="int3")
    q = option("nvfp4a16")
    with pytest.raises(ConfigError, match="multiples of 16"):
        q.check_widths([576, 100])
    with pytest.raises(ConfigError, match="activations in groups of 128"):
        option("fp8_block").check_widths([576, 1536])  # SmolLM2-135M: 576 = 4.5 groups
    option("fp8").check_widths([576, 100])  # rows: any width


def test_fused_groups_share_the_global_absmax(two_layers):
    """NVFP4: q/k/v and gate/up take one global scale (the largest absmax of the group), as
    llm-compressor fuses them for vLLM; o_proj and down_proj their own."""
    model = two_layers.model
    got = fused_absmax(model, option("nvfp4a16"))
    attn = model.model.layers[0].self_attn
    qkv = max(
        attn.q_proj.weight.abs().max(),
        attn.k_proj.weight.abs().max(),
        attn.v_proj.weight.abs().max(),
    )
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], qkv.detach())
    assert "model.layers.0.self_attn.o_proj.weight" not in got
    assert fused_absmax(model, option("mxfp4a16")) == {}


GAP = ["attack=gap", "attack.inject_steps=6", "attack.repair_steps=6", "attack.batch_size=4"]


def test_gap_targets_serving_formats_through_the_library(make_cfg, tmp_path):
    """attack=gap with NVFP4, MXFP4 and FP8-block boxes intersected (tiny model): every
    target's stored bytes equal the injected model's, and llm-compressor quantizing the
    repaired model gives exactly the injected model's de-quantized weights."""
    from qexp.core.context import RunContext
    from qexp.pipeline.spec import validate

    def attacked(*extra):
        spec = validate(
            make_cfg(
                *GAP,
                "quantizer=nvfp4a16",
                "attack.targets=[nvfp4a16,mxfp4a16,fp8_block]",
                f"cache_dir={tmp_path / 'cache'}",
                "cache=on",
                *extra,
            )
        )
        ctx = RunContext.from_schema(spec.run, tmp_path)
        loaded = spec.model.load(ctx)
        out = spec.attack.apply(subject(loaded.model, loaded.tokenizer), ctx)
        return spec, ctx, out

    spec, ctx, out = attacked()
    manifest = out.info
    assert manifest["codes_equal_injected"] == {
        "nvfp4a16": True,
        "mxfp4a16": True,
        "fp8_block": True,
    }
    assert manifest["assumes"]["nvfp4a16"] == {"nvfp4_fused_global_scale": True}
    (entry,) = (ctx.cache_dir / "stages" / "gap_inject").glob("*/tensors.safetensors")
    from safetensors.torch import load_file

    injected = load_file(str(entry))
    repaired = {n: p.detach().clone() for n, p in out.model.named_parameters()}
    moved = sum(int((repaired[n] != injected[n]).sum()) for n in manifest["trainable"])
    assert moved > 0
    q_rep = spec.quantizer.quantize(subject(out.model), ctx).model
    _, ctx2, out2 = attacked()
    with torch.no_grad():
        for n, p in out2.model.named_parameters():
            if n in injected:
                p.copy_(injected[n])
    q_inj = spec.quantizer.quantize(subject(out2.model), ctx2).model
    for n in manifest["trainable"]:
        a = dict(q_rep.named_parameters())[n]
        b = dict(q_inj.named_parameters())[n]
        assert torch.equal(a, b), n


def test_defenses_take_serving_formats(make_cfg, tmp_path):
    """defense=noise sized by MXFP4's intervals, end to end through the pipeline; quantguard
    finds the format's neighbouring grid points."""
    from qexp.pipeline.run import run

    res = run(
        make_cfg(
            *GAP,
            "quantizer=mxfp4a16",
            "defense=noise",
            "benchmark=instruct",
            "benchmark.limit=2",
            "benchmark.max_new_tokens=4",
        ),
        tmp_path,
    )
    assert set(res.conditions) == {"original", "attacked", "original_q", "attacked_q"}
    q = option("mxfp4a16")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    down, up = q.neighbours(w)
    deq = q.fake_quant(w)
    assert (down <= deq).all() and (deq <= up).all() and (up > down).any()


@pytest.mark.parametrize("fmt", ["nvfp4a16", "mxfp4a16", "fp8"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_neighbours_are_what_the_compressor_dequantizes(two_layers, fmt, dtype):
    """quantguard moves weights onto a neighbouring code's value: the library must store that
    code and de-quantize exactly that value (NVFP4 de-quantizes to bfloat16, so a float32
    neighbour would not be a grid point; found when quantguard stopped under nvfp4a16)."""
    q = option(fmt)
    g = torch.Generator().manual_seed(0)
    for name in linears(two_layers.model)[:3]:
        w = two_layers.model.get_submodule(name).weight.detach().to(DTYPES[dtype])
        deq = q.fake_quant(w)
        down, up = q.neighbours(w)
        lo, hi = q.intervals(w)
        pick = (torch.rand(w.shape, generator=g) < 0.1) & (lo < hi)
        other = torch.where(w.float() >= deq, up, down)
        moved = torch.where(pick, other, w.float()).to(w.dtype)
        assert torch.equal(q.fake_quant(moved), torch.where(pick, other, deq)), name
        assert bool((other != deq)[pick].any())
