"""qexp.audit: known answers for each statistic, and the CLI on tiny random checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from qexp.audit import gap, prune, refdiff, reparam
from qexp.audit.cli import main
from qexp.audit.stats import robust_z
from qexp.checkpoint.reader import Checkpoint
from qexp.core.geometry import geometry
from qexp.defenses.canonicalize import col_sq, row_norms

TINY = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=300,
    tie_word_embeddings=True,
)


def save_tiny(path: Path, arch: str = "llama", seed: int = 0, **kw: int) -> Path:
    """A random tiny model of `arch` saved as a safetensors checkpoint directory."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **{**TINY, **kw})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


def run_cli(ckpt: Path, out: Path, *extra: str) -> tuple[int, dict]:
    rc = main([str(ckpt), "--out", str(out), "--no-progress", "--no-plots", *extra])
    report = json.loads((out / "audit.json").read_text()) if rc != 2 else {}
    return rc, report


# ---- statistics with known answers -------------------------------------------------------


def test_robust_z_known_answer() -> None:
    z = robust_z([1, 2, 3, 4, 5, 6, 7, 8, 9])  # median 5, MAD 2
    assert z[-1] == pytest.approx(4 / (2 * 1.4826))
    assert robust_z([1.0, 2.0, 3.0]) == [None, None, None]  # too small a population


def head_features(wq, wk, wv, wo, geo) -> list[dict[str, float]]:
    """reparam's per kv-head features of one layer from its four attention weights."""
    ws = {"q_weight": wq, "k_weight": wk, "v_weight": wv, "o_weight": wo}
    return reparam.features({r: reparam.reduce(r, w, geo) for r, w in ws.items()}, geo)


def test_vo_cond_reads_back_kappa() -> None:
    torch.manual_seed(0)
    geo = geometry(
        {
            "model_type": "llama",
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "head_dim": 16,
        }
    )
    # a balanced pair: W_v = S^½ Qᵀ, W_o = P S^½ (P, Q orthonormal columns)
    p, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))
    s = torch.linspace(1, 2, 16, dtype=torch.float64).sqrt()
    wv, wo = s[:, None] * q.T, p * s[None, :]
    wq = wk = torch.randn(16, 64, dtype=torch.float64)
    assert head_features(wq, wk, wv, wo, geo)[0]["vo_cond"] == pytest.approx(0, abs=1e-9)
    kappa = 30.0
    d = torch.logspace(0, math.log10(kappa), 16, dtype=torch.float64)
    f = head_features(wq * 5, wk / 5, d[:, None] * wv, wo / d[None, :], geo)[0]
    assert f["vo_cond"] == pytest.approx(math.log10(kappa), abs=1e-9)
    assert f["qk_scale"] == pytest.approx(math.log(25.0), abs=1e-9)
    assert f["vo_scale"] == pytest.approx(
        math.log(float((d[:, None] * wv).norm() / (wo / d[None, :]).norm())), abs=1e-12
    )


def test_mlp_spread_known_answer() -> None:
    up = torch.ones(8, 4, dtype=torch.float64) * torch.arange(1, 9, dtype=torch.float64)[:, None]
    down = torch.ones(4, 8, dtype=torch.float64)
    logs = torch.log(torch.arange(1, 9, dtype=torch.float64))
    q = torch.quantile(logs, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert reparam.spread(row_norms(up), col_sq(down).sqrt()) == pytest.approx(float(q[1] - q[0]))


def _place(q, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """w with every non-pinned weight moved to position u of its own interval."""
    lo, hi = q.intervals(w)
    new = torch.where(hi > lo, lo + u * (hi - lo), w.double()).float()
    lo2, hi2 = q.intervals(new)
    assert torch.equal(lo2 < hi2, lo < hi)  # the grid did not move
    return new


@pytest.mark.parametrize("target", ["bnb_nf4", "gguf_q4_0", "rtn4", "bnb_int8"])
def test_gap_statistic_known_answers(target: str) -> None:
    from qexp.quantizers.base import grid_quantizer

    q = grid_quantizer(target, "target")
    g = torch.Generator().manual_seed(1)
    # on the library's input lattice (LLM.int8 quantizes float16), so each box is the
    # lattice's own and placing a weight at u keeps it at u
    w = q.library_input(torch.randn(256, 256, generator=g) * 0.02).float()
    bins = gap.n_bins(w.numel())
    assert bins == 320
    # uniform positions: no spike
    u = torch.rand(w.shape, generator=g, dtype=torch.float64) * 0.98 + 0.01
    d = torch.Generator().manual_seed(2)  # the dither's own stream
    s = gap.spike_stats(gap.counts(q, _place(q, w, u), bins, d)[0], bins)
    assert s["spike"] < gap.SPIKE_MIN and s["p_bins"] > gap.ALPHA
    # 10% of the weights at the PGD edge margin u = 0.05 (default box_margin), rest uniform
    edge = torch.rand(w.shape, generator=g) < 0.10
    u2 = torch.where(edge, torch.full_like(u, 0.05), u)
    s = gap.spike_stats(gap.counts(q, _place(q, w, u2), bins, d)[0], bins)
    if target == "bnb_int8":  # the library sees float16(w): the pile is blurred by its ulp
        assert s["spike_u"] == pytest.approx(0.05, abs=0.02)
        assert s["spike"] > gap.SPIKE_MIN and s["p_bins"] < 1e-100  # 10: less sharp
    else:
        assert s["spike_u"] == pytest.approx(0.05)
        assert s["spike_mass"] == pytest.approx(0.10 + 1 / bins * 0.9 / 0.98, abs=0.01)
        assert s["spike"] > 20 and s["p_bins"] < 1e-100
    # all weights exactly on the grid (u = 1/2): reported, not a spike
    s = gap.spike_stats(gap.counts(q, _place(q, w, torch.full_like(u, 0.5)), bins, d)[0], bins)
    blurred = target == "bnb_int8"  # ±½ float16 ulp around the centre
    assert s["centre_mass"] == pytest.approx(1.0) or blurred and s["centre_mass"] > 0.5
    assert s["spike"] < gap.SPIKE_MIN


def test_gap_dither_undoes_bfloat16_lattice() -> None:
    from qexp.quantizers.base import grid_quantizer

    q = grid_quantizer("bnb_nf4", "target")
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(512, 512, generator=g) * 0.02).to(torch.bfloat16)
    bins = gap.n_bins(w.numel())
    assert gap.spike_stats(gap.counts(q, w, bins, g)[0], bins)["spike"] < gap.SPIKE_MIN


# ---- checkpoints and the CLI ---------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,seed", [("llama", 0), ("llama", 1), ("qwen2", 2), ("mistral", 3), ("qwen3", 4)]
)
def test_clean_tiny_models_exit_0(tmp_path: Path, arch: str, seed: int) -> None:
    ckpt = save_tiny(tmp_path / "m", arch, seed)
    rc, rep = run_cli(ckpt, tmp_path / "out")
    assert rc == 0, rep["suspicious_checks"]
    assert rep["checks"]["reparam"]["verdict"] == "clean"
    assert rep["checks"]["gap"]["verdict"] == "clean"
    assert (tmp_path / "out" / "summary.txt").is_file()


def _encrypt(src: Path, dst: Path, *overrides: str) -> Path:
    from qexp.tools.encrypt import encrypt_checkpoint, load_attack

    encrypt_checkpoint(src, dst, load_attack(["kappa_one_layers=0", *overrides]), False)
    return dst


@pytest.mark.parametrize(
    "overrides,feature",
    [
        (["mechanisms=[a]"], "vo_cond"),
        (["mechanisms=[c]", "needle_sites=[qk]"], "qk_scale"),
        (["mechanisms=[c]", "needle_sites=[vo]"], "vo_scale"),
        (["mechanisms=[a]", "mlp=true"], "mlp_spread"),
    ],
)
def test_encrypted_tiny_model_is_flagged(tmp_path: Path, overrides: list, feature: str) -> None:
    clean = save_tiny(tmp_path / "clean")
    enc = _encrypt(clean, tmp_path / "enc", *overrides)
    rc, rep = run_cli(enc, tmp_path / "out", "--checks", "reparam")
    assert rc == 1
    assert rep["checks"]["reparam"]["features"][feature]["n_flagged"] > 0


@pytest.mark.parametrize("target", ["bnb_nf4", "nvfp4a16", "mxfp4a16"])
def test_gap_like_tiny_model_is_flagged_and_diffed(tmp_path: Path, target: str) -> None:
    """Placed inside bitsandbytes' or a compressed-tensors format's boxes: flagged."""
    from qexp.quantizers.base import grid_quantizer

    if target != "bnb_nf4":
        pytest.importorskip("llmcompressor")

    # 128 x 256 weights: B = 160 bins, so a pile of a few percent stands out
    clean = save_tiny(
        tmp_path / "clean", seed=5, hidden_size=128, head_dim=32, intermediate_size=256
    )
    q = grid_quantizer(target, "t")
    sd = load_file(str(clean / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    touched = ["model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.o_proj.weight"]
    for name in touched:  # PGD-like: 10% of the weights at each box margin, the rest uniform
        w = sd[name]
        u = torch.rand(w.shape, generator=g, dtype=torch.float64)
        pick = torch.rand(w.shape, generator=g, dtype=torch.float64)
        u = torch.where(pick < 0.1, 0.05, torch.where(pick > 0.9, 0.95, u))
        sd[name] = _place(q, w, u).contiguous()
    att = tmp_path / "att"
    att.mkdir()
    (att / "config.json").write_text((clean / "config.json").read_text())
    save_file(sd, str(att / "model.safetensors"), metadata={"format": "pt"})
    rc, rep = run_cli(att, tmp_path / "out", "--reference", str(clean), "--quantizer", target)
    assert rc == 1
    flagged = {f["tensor"] for f in rep["checks"]["gap"]["flagged"]}
    assert flagged == set(touched)
    assert all(f["p"] < 1e-6 for f in rep["checks"]["gap"]["flagged"])
    ref = rep["checks"]["reference"]
    assert {c["tensor"] for c in ref["changed"]} == set(touched)
    assert ref["changed_by_layer"] == {"3": 2}
    assert rep["checks"]["reparam"]["verdict"] == "clean"


def test_reference_diff_exact(tmp_path: Path) -> None:
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    x = torch.arange(8.0).reshape(2, 4)
    save_file({"model.layers.0.mlp.up_proj.weight": x, "other": torch.ones(3)}, str(a))
    y = x.clone()
    y[0, 1] += 2.0
    save_file({"model.layers.0.mlp.up_proj.weight": y, "other": torch.ones(3), "new": x}, str(b))
    with Checkpoint(b) as cb, Checkpoint(a) as ca:
        r = refdiff.run(cb, ca, progress=False)
    (c,) = r["changed"]
    assert c["tensor"] == "model.layers.0.mlp.up_proj.weight"
    assert c["changed_fraction"] == pytest.approx(1 / 8)
    assert c["max_abs_diff"] == pytest.approx(2.0)
    assert c["rel_frobenius"] == pytest.approx(2.0 / float(x.norm()))
    assert r["only_in_checkpoint"] == ["new"] and r["verdict"] == "suspicious"


def test_sharded_checkpoint_same_report(tmp_path: Path) -> None:
    one = save_tiny(tmp_path / "one", seed=7)
    torch.manual_seed(7)
    cfg = AutoConfig.for_model("llama", **TINY)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(
        tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB"
    )
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, r1 = run_cli(one, tmp_path / "o1", "--quantizer", "rtn4")
    _, r2 = run_cli(tmp_path / "sharded", tmp_path / "o2", "--quantizer", "rtn4")
    assert r1["checks"]["gap"]["score"] == r2["checks"]["gap"]["score"]
    assert r1["checks"]["reparam"]["score"] == r2["checks"]["reparam"]["score"]


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "CHECKPOINT=" in capsys.readouterr().err
    ckpt = save_tiny(tmp_path / "m")
    assert main([str(ckpt), "--quantizer", "bogus", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--quantizer='bogus'" in err and "bnb_nf4" in err
    assert main([str(ckpt), "--checks", "gapp", "--out", str(tmp_path / "o")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file at all")
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "qexp-audit: error:" in capsys.readouterr().err
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main([str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "llama" in capsys.readouterr().err


def test_differential_runs_and_clean_tiny_model_passes(tmp_path: Path) -> None:
    from qexp.models.tiny import tiny_tokenizer

    ckpt = save_tiny(tmp_path / "m", seed=3, vocab_size=512)
    tiny_tokenizer(512).save_pretrained(ckpt)
    rc, rep = run_cli(ckpt, tmp_path / "out", "--differential", "--quantizer", "rtn4,bnb_int8")
    d = rep["checks"]["differential"]
    assert rc == 0 and d["verdict"] == "clean"
    for t in ("rtn4", "bnb_int8"):
        r = d["per_target"][t]
        assert 0 <= r["kl"] < r["kl_limit"] and 0 <= r["top1_agreement"] <= 1
    assert d["probe_tokens"] > 0


def test_gap_dither_follows_llm_int8s_float16_cast_of_float32_weights() -> None:
    """LLM.int8 quantizes float16(w): float32 weights just off the float16 lattice (as a
    float32 checkpoint de-quantized from a coarse grid has them) must not make spikes."""
    from qexp.quantizers.base import grid_quantizer

    q = grid_quantizer("bnb_int8", "t")
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(256, 256, generator=g) < 0.5, -1.0, 1.0)
    w16 = ((torch.rand(256, 256, generator=g) * 0.5 + 0.5) * sign * 0.05).half().float()
    _, e = torch.frexp(w16)
    w = w16 + 0.2 * torch.ldexp(torch.ones_like(w16), e - 11)  # 0.2 float16 ulp above
    bins = gap.n_bins(w.numel())
    c, _ = gap.counts(q, w, bins, g)
    assert gap.spike_stats(c, bins)["spike"] < gap.SPIKE_MIN  # 6696 before the cast was seen


# ---- one parallel pass, sampling -----------------------------------------------------------


def test_vo_condition_from_r_factors_equals_balance_vo() -> None:
    from qexp.defenses.canonicalize import balance_vo

    g = torch.Generator().manual_seed(3)
    wv = torch.randn(16, 64, generator=g, dtype=torch.float64)
    heads = [torch.randn(64, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    a, _ = balance_vo(wv, heads)
    r_v = torch.linalg.qr(wv.T).R
    r_o = torch.linalg.qr(torch.cat(heads)).R
    assert reparam.vo_condition(r_v, r_o) == pytest.approx(float(torch.linalg.cond(a)), rel=1e-9)


def test_parallel_scan_equals_serial_and_seed_reproduces(tmp_path: Path) -> None:
    ckpt = save_tiny(tmp_path / "m", "qwen2", 5)
    reports = {}
    for name, extra in (
        ("serial", ["--threads", "1", "--seed", "7"]),
        ("parallel", ["--threads", "3", "--seed", "7"]),
        ("other", ["--threads", "2", "--seed", "8", "--gap-sample", "2048"]),
    ):
        rc, rep = run_cli(ckpt, tmp_path / name, *extra)
        assert rc == 0
        reports[name] = rep
    strip = ("runtime_s", "peak_rss_mib", "threads")
    for rep in reports.values():
        for c in rep["checks"].values():
            assert c.pop("cpu_s") >= 0  # timings differ run to run
    same = [{k: v for k, v in reports[n].items() if k not in strip} for n in ("serial", "parallel")]
    assert same[0] == same[1]
    assert same[0]["seed"] == 7 and same[0]["checks"]["gap"]["sampling"]["seed"] == 7
    scored = {r["scored"] for r in reports["other"]["checks"]["gap"]["tensors"]}
    assert min(scored) == 2048  # the 128x64 up/gate and 64x128 down tensors were sampled
    _, drawn = run_cli(ckpt, tmp_path / "drawn")
    assert isinstance(drawn["seed"], int)  # drawn at random, recorded


def test_sample_rows_keeps_whole_blocks_and_finds_a_pile() -> None:
    from qexp.quantizers.base import grid_quantizer

    q = grid_quantizer("bnb_nf4", "target")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1024, 256, generator=g) * 0.02
    assert gap.sample_rows(w, 0, 1, "t") is w and gap.sample_rows(w, 10**9, 1, "t") is w
    s = gap.sample_rows(w, 256 * 100, 1, "t")
    assert s.shape == (100, 256)  # width a multiple of 64: single rows
    assert torch.equal(gap.sample_rows(w, 256 * 100, 1, "t"), s)  # seeded
    assert not torch.equal(gap.sample_rows(w, 256 * 100, 2, "t"), s)
    odd = torch.randn(600, 96, generator=g)  # 96 = 32 * 3: runs of 2 rows hold whole 64-blocks
    s = gap.sample_rows(odd, 96 * 40, 1, "t")
    assert s.shape == (40, 96)
    rows = [next(r for r in range(600) if torch.equal(odd[r], x)) for x in s]
    assert all(rows[i] % 2 == 0 and rows[i + 1] == rows[i] + 1 for i in range(0, 40, 2))
    # a 10% pile at u = 0.05 over the whole tensor is found on a 1/8 sample
    u = torch.rand(w.shape, generator=g, dtype=torch.float64) * 0.98 + 0.01
    u = torch.where(torch.rand(w.shape, generator=g) < 0.1, torch.full_like(u, 0.05), u)
    piled = _place(q, w, u)
    ws = gap.sample_rows(piled, 128 * 256, 3, "t")
    bins = gap.n_bins(ws.numel())
    st = gap.spike_stats(gap.counts(q, ws, bins, g)[0], bins)
    assert st["spike_u"] == pytest.approx(0.05)
    assert st["spike"] > 3 * gap.SPIKE_MIN and st["p_bins"] < 1e-50


def test_prune_cut_ratio_known_answer() -> None:
    """100 weights just below the 50% cut (t = 1), 80 just above: ratio 100/80."""
    w = torch.tensor([0.5] * 100 + [0.95] * 100 + [1.0] + [1.05] * 80 + [3.0] * 119)
    w = w * torch.where(torch.arange(400) % 2 == 0, 1.0, -1.0)  # signs do not matter
    assert prune.cut_ratio(w, 0.5) == pytest.approx(100 / 80)
    assert prune.cut_ratio(torch.zeros(400), 0.5) is None  # no cut to speak of
    assert prune.cut_ratio(w[:40], 0.5) is None  # too few weights either side


def test_weights_trained_above_a_magnitude_cut_are_flagged(tmp_path: Path) -> None:
    """What prune_gap against magnitude does: train only the weights the mask keeps (|w|
    above the 50% cut); the density at that cut breaks and the prune check flags exactly
    those tensors, at sparsity 0.5."""
    clean = save_tiny(
        tmp_path / "clean", seed=6, hidden_size=256, head_dim=64, intermediate_size=512
    )
    sd = load_file(str(clean / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    touched = ["model.layers.3.mlp.up_proj.weight", "model.layers.2.self_attn.o_proj.weight"]
    for name in touched:  # small steps, as a few hundred Adam steps at lr 2e-4 make
        w = sd[name]
        kept = w.abs() >= w.abs().median()
        step = torch.randn(w.shape, generator=g) * 0.1 * w.abs().median()  # |w| moves by step
        sd[name] = torch.where(kept, w + w.sign() * step, w)
    att = tmp_path / "att"
    att.mkdir()
    (att / "config.json").write_text((clean / "config.json").read_text())
    save_file(sd, str(att / "model.safetensors"), metadata={"format": "pt"})
    rc, rep = run_cli(att, tmp_path / "out", "--checks", "prune")
    assert rc == 1
    p = rep["checks"]["prune"]
    assert set(p["flagged"]) == set(touched)
    assert {x["at"] for x in p["tensors"] if x["flag"]} == {0.5}
    rc, rep = run_cli(clean, tmp_path / "out_clean", "--checks", "prune")
    assert rc == 0 and rep["checks"]["prune"]["score"]["max_ratio"] < prune.RATIO
