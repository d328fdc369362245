"""defense=noise: closed form, σ̂ by hand, real-library code changes, S-curve, pipeline."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from qexp.core.errors import ConfigError
from qexp.defenses.changes import Geometry, expected_flip_fraction
from qexp.defenses.noise import SCURVE_SIGMAS, Noise, scurve
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from qexp.quantizers.base import NoQuantizer
from qexp.quantizers.bnb import BitsAndBytes
from qexp.quantizers.gguf import GGUFQuant
from qexp.quantizers.rtn import RTN
from tests.conftest import CLI_TINY, CONF, ROOT, plain_ctx, subject

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def ctx_for(tmp_path, seed=0):
    return plain_ctx(tmp_path, seed)


# ---------------------------------------------------------------- closed form


def test_expected_flip_fraction_matches_numerical_integral():
    """1 - (1/2h) ∫_{-h}^{h} [Φ((h-u)/σ) - Φ((-h-u)/σ)] du, by the trapezoid rule."""
    h = 1.0
    u = torch.linspace(-h, h, 200_001, dtype=torch.float64)
    for ratio in (0.05, 0.3, 1.0, 2.57, 10.0):
        s = ratio * h
        stay = torch.special.ndtr((h - u) / s) - torch.special.ndtr((-h - u) / s)
        numeric = 1 - float(torch.trapezoid(stay, u)) / (2 * h)
        assert expected_flip_fraction(ratio) == pytest.approx(numeric, abs=1e-9)
    # docs/design.md §5 sanity law (σ = h: ~39%, σ = 2.57 h: ~70%) and the limits
    assert expected_flip_fraction(1.0) == pytest.approx(0.390452, abs=1e-6)
    assert expected_flip_fraction(2.57) == pytest.approx(0.704, abs=1e-3)
    assert expected_flip_fraction(0.0) == 0.0
    assert expected_flip_fraction(1e6) == pytest.approx(1.0, abs=1e-5)
    r = torch.logspace(-3, 3, 61, dtype=torch.float64)
    assert (torch.diff(expected_flip_fraction(r)) > 0).all()


def test_expected_flip_fraction_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    u = (torch.rand(400_000, generator=g, dtype=torch.float64) * 2 - 1) * 1.0
    eps = torch.randn(400_000, generator=g, dtype=torch.float64)
    for ratio in (0.5, 1.0, 2.0):
        mc = float(((u + ratio * eps).abs() > 1.0).double().mean())
        assert mc == pytest.approx(expected_flip_fraction(ratio), abs=3e-3)


# ---------------------------------------------------------------- σ̂ on a hand-made model


class Hand(nn.Module):
    """Three bias-free linears with known int8-symmetric half-widths (h = row absmax / 254)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2, bias=False)
        self.b = nn.Linear(4, 1, bias=False)
        self.c = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            # a: rows with absmax 1 and 2 -> non-pinned h: three of 1/254, three of 2/254
            self.a.weight.copy_(torch.tensor([[1.0, 0.1, 0.2, 0.3], [2.0, 0.1, 0.2, 0.3]]))
            self.b.weight.copy_(torch.tensor([[4.0, 0.5, -0.5, 1.0]]))  # h = 4/254
            self.c.weight.copy_(torch.tensor([[8.0, 1.0, 2.0, 3.0]]))  # h = 8/254


RTN8 = RTN(name="rtn8sym", bits=8, group_size=-1, symmetric=True, skip=[])


@pytest.mark.parametrize(
    ("stat", "global_stat", "expect_h", "expect_hat"),
    [
        # median of {1,1,1,2,2,2}/254 = 1.5/254 (linear interpolation); median over tensors
        ("p50", "p50", {"a": 1.5, "b": 4.0, "c": 8.0}, 4.0),
        # p25 of {1.5, 4, 8} = 1.5 + 0.5 (4 - 1.5) = 2.75
        ("p50", "p25", {"a": 1.5, "b": 4.0, "c": 8.0}, 2.75),
        # p25 of {1,1,1,2,2,2} = 1 (index 1.25 in the sorted values)
        ("p25", "p50", {"a": 1.0, "b": 4.0, "c": 8.0}, 4.0),
        ("p75", "p75", {"a": 2.0, "b": 4.0, "c": 8.0}, 6.0),
    ],
)
def test_sigma_hat_on_a_hand_made_model(tmp_path, stat, global_stat, expect_h, expect_hat):
    model = Hand()
    d = Noise(sigma="per_layer", stat=stat, global_stat=global_stat, diagnostics=False)
    st = d.apply(subject(model), RTN8, ctx_for(tmp_path)).info
    # boxes end on float32 lattice values (what RTN's float32 arithmetic decides), a few ulps
    # from the real-number step / 2
    assert st["sigma_hat"] == pytest.approx(expect_hat / 254, rel=1e-5)
    assert st["sigma_global"] == st["sigma_hat"]
    for name, h in expect_h.items():
        row = st["tensors"][f"{name}.weight"]
        assert row["h"] == pytest.approx(h / 254, rel=1e-5)
        assert row["sigma"] == row["h"]  # per_layer: σ_ℓ = h_ℓ


def test_global_and_fixed_apply_one_sigma_to_every_tensor(tmp_path):
    for sigma, expect in (("global", 4.0 / 254), ("fixed", 1e-3), ("2e-4", 2e-4)):
        # (float32 lattice edges: rel 1e-5 of the real-number half-step)
        d = Noise(sigma=sigma, diagnostics=False)
        st = d.apply(subject(Hand()), RTN8, ctx_for(tmp_path)).info
        assert st["sigma_global"] == pytest.approx(expect, rel=1e-5)
        assert {r["sigma"] for r in st["tensors"].values()} == {st["sigma_global"]}
        assert st["sigma_hat"] == pytest.approx(4.0 / 254, rel=1e-5)


# ---------------------------------------------------------------- codes from the real library


def structured_weight(seed: int) -> torch.Tensor:
    """16 x 128, +1 / -1 at the first two positions of every 32-block, the rest in ±0.7.

    Every block, group and row of every qexp quantizer then has its scale set by those two
    weights, and noise of at most ±0.2 on the others can never overtake them.
    """
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(16, 128, generator=g) * 2 - 1) * 0.7
    w[:, 0::32], w[:, 1::32] = 1.0, -1.0
    return w


QUANTIZERS = {
    "rtn4_g64": RTN(name="rtn4", bits=4, group_size=64),
    "rtn8_sym_g32": RTN(name="rtn8", bits=8, group_size=32, symmetric=True),
    "rtn3_g128": RTN(name="rtn3", bits=3, group_size=128),
    **{f"gguf_{q}": GGUFQuant(name=q, qtype=q) for q in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")},
}
if HAS_BNB:
    QUANTIZERS.update({f"bnb_{m}": BitsAndBytes(name=m, mode=m) for m in ("int8", "nf4", "fp4")})


@pytest.mark.parametrize("case", sorted(QUANTIZERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_library_code_changes_equal_the_interval_route(case, seed):
    """With the scale setters fixed, a weight's library code changes iff it left its interval."""
    q = QUANTIZERS[case]
    w = structured_weight(seed)
    geo = Geometry.of(q, w)
    h = float(geo.half_widths.median())
    g = torch.Generator().manual_seed(100 + seed)
    eps = (torch.randn(w.shape, generator=g) * h).clamp(-0.2, 0.2)
    eps[:, 0::32] = eps[:, 1::32] = 0.0
    noisy = w + eps
    library = q.weight_codes(noisy) != q.weight_codes(w)
    x = q.library_input(noisy).double()  # what the library quantizes (float16 for LLM.int8)
    intervals = (x < geo.lo) | (x > geo.hi)
    assert torch.equal(library, intervals)
    frac = float(library[geo.movable].double().mean())
    assert 0.2 < frac < 0.6, frac  # σ = median h: near the uniform law's 0.39
    if isinstance(q, RTN) or case == "bnb_int8":  # codes() is per weight, in order
        n = w.numel()
        raw = q.codes(noisy).reshape(-1)[:n] != q.codes(w).reshape(-1)[:n]
        assert int(raw.sum()) == int(library.sum())


@pytest.mark.parametrize("case", sorted(QUANTIZERS))
def test_weight_codes_reconstruct_the_library_values(case):
    """Decoded codes are one-to-one with the library's de-quantized values within a block."""
    q = QUANTIZERS[case]
    w = structured_weight(3)
    codes = q.weight_codes(w)
    assert codes.shape == w.shape
    lo, hi = q.intervals(w)
    # equal codes in one row <=> the weights share an interval (same grid point)
    for r in range(4):
        for j in range(2, 30):
            same_code = bool(codes[r, j] == codes[r, j + 1])
            same_box = bool(lo[r, j] == lo[r, j + 1] and hi[r, j] == hi[r, j + 1])
            if lo[r, j] < hi[r, j] and lo[r, j + 1] < hi[r, j + 1]:
                assert same_code == same_box, (r, j)


def test_rtn_intervals_with_a_short_last_group():
    """576 columns under group 128: four full groups and a last group of 64 with its own scale."""
    q = RTN(name="rtn4", bits=4, group_size=128)
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    lo, hi = q.intervals(w)
    assert lo.shape == w.shape and (lo <= w.double()).all() and (w.double() <= hi).all()
    # moving every weight inside its box keeps every code
    u = torch.rand(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inside = (lo + (hi - lo) * (0.05 + 0.9 * u)).float()
    assert torch.equal(q.codes(inside), q.codes(w))
    assert torch.equal(q.weight_codes(inside), q.weight_codes(w))


# ---------------------------------------------------------------- the S-curve


def uniform_rows(rows: int = 64, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """Row absmax 1 (first column, pinned); the rest uniform over 25 whole int8 intervals.

    Step s = 1/127: the others lie in [-12.5 s, 12.5 s], so each sits uniformly inside its
    interval [k s - s/2, k s + s/2], and they are < 0.1 of the absmax, so the noise on the
    absmax barely moves the grid.
    """
    g = torch.Generator().manual_seed(seed)
    s = 1.0 / 127
    w = (torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1) * 12.5 * s
    w[:, 0] = 1.0
    return w.float()


UNIFORM_CASES = {"rtn8_sym_row": RTN8}
if HAS_BNB:
    UNIFORM_CASES["bnb_int8"] = BitsAndBytes(name="bnb_int8", mode="int8")


@pytest.mark.parametrize("case", sorted(UNIFORM_CASES))
def test_scurve_is_monotone_and_matches_the_closed_form(case):
    q = UNIFORM_CASES[case]
    w = uniform_rows()
    h = 0.5 / 127
    curve = scurve(q, {"w": w}, {"w": h}, sigma_hat=h, rows=-1)
    assert curve["method"] == "library" and curve["n_weights"] == w.numel()
    fr = [p["fraction_changed"] for p in curve["grid"]]
    ivl = [p["fraction_changed_intervals"] for p in curve["grid"]]
    assert all(b >= a for a, b in zip(fr, fr[1:])), fr
    assert all(b >= a for a, b in zip(ivl, ivl[1:])), ivl
    # LLM.int8's boxes are float16-lattice boxes, narrower than s by up to a float16 step
    # (~0.4% of s here), which the closed form on h = s / 2 does not know
    rel = 1e-2 if case == "bnb_int8" else 1e-4
    for p, s in zip(curve["grid"], SCURVE_SIGMAS):
        expect = expected_flip_fraction(s / h)
        assert p["sigma"] == s
        assert p["theory_uniform"] == pytest.approx(expect, rel=rel, abs=1e-9)
        assert p["fraction_changed"] == pytest.approx(expect, abs=0.01), s
        assert p["fraction_changed_intervals"] == pytest.approx(expect, abs=0.01), s
    for key in ("per_layer", "global"):  # both at σ = h here
        pt = curve["points"][key]
        assert pt["fraction_changed"] == pytest.approx(0.3905, abs=0.01)
    assert curve["theory_sigma_equals_h"] == pytest.approx(0.390452, abs=1e-6)


# ---------------------------------------------------------------- apply on models


def test_noise_is_seeded_and_has_the_configured_scale(tmp_path):
    def noisy(seed):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(512, 256, bias=False), nn.Linear(256, 512, bias=False))
        clean = {k: v.clone() for k, v in m.state_dict().items()}
        d = Noise(sigma="per_layer", diagnostics=False)
        q = RTN(name="rtn4", bits=4, group_size=128, skip=[])
        st = d.apply(subject(m), q, ctx_for(tmp_path, seed)).info
        return clean, m.state_dict(), st

    clean, a, st = noisy(0)
    _, b, _ = noisy(0)
    _, c, _ = noisy(1)
    for k in a:
        assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])
        sigma = st["tensors"][k]["sigma"]
        assert float((a[k] - clean[k]).std()) == pytest.approx(sigma, rel=0.03)
    assert 0.3 < st["fraction_changed"] < 0.5  # σ_ℓ = h_ℓ: near the uniform law
    assert st["fraction_changed_method"] == "library"
    assert st["n_weights_measured"] < st["n_params_noised"]  # pinned weights excluded


def test_scope_all_noises_every_float_parameter(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 32))
    clean = {k: v.clone() for k, v in m.state_dict().items()}
    d = Noise(sigma="per_layer", scope="all", diagnostics=False)
    q = RTN(name="rtn8", bits=8, group_size=32, skip=["2"])
    st = d.apply(subject(m), q, ctx_for(tmp_path)).info
    for k, v in m.state_dict().items():
        assert not torch.equal(v, clean[k]), k
    assert set(st["tensors"]) == set(clean)
    # only 0.weight is quantized: it has its own h; the rest get σ̂
    assert "h" in st["tensors"]["0.weight"] and "h" not in st["tensors"]["2.weight"]
    assert st["tensors"]["2.weight"]["sigma"] == st["tensors"]["1.weight"]["sigma"]
    assert st["tensors"]["2.weight"]["sigma"] == st["sigma_hat"]


def test_fixed_sigma_without_a_grid_quantizer(tmp_path):
    m = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 8, bias=False))
    d = Noise(sigma="fixed")
    st = d.apply(subject(m), NoQuantizer(), ctx_for(tmp_path)).info
    assert st["sigma_global"] == 1e-3 and st["n_tensors"] == 2
    assert "fraction_changed" not in st and "sigma_hat" not in st  # absent, never a fake 0
    assert not list(tmp_path.glob("noise_*"))


@pytest.mark.parametrize("sigma", ["global", "per_layer"])
def test_interval_sigma_needs_a_grid_quantizer(make_cfg, tmp_path, sigma):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("defense=noise", f"defense.sigma={sigma}", "quantizer=none"))
    assert e.value.key == "defense.sigma" and "fixed" in e.value.allowed
    with pytest.raises(ConfigError, match="defense.sigma"):  # and at apply time, before work
        Noise(sigma=sigma).apply(subject(nn.Linear(4, 4)), NoQuantizer(), ctx_for(tmp_path))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("defense.sigma=big", "defense.sigma"),
        ("defense.sigma=-1e-3", "defense.sigma"),
        ("defense.stat=p90", "defense.stat"),
        ("defense.global_stat=mean", "defense.global_stat"),
        ("defense.scope=embeddings", "defense.scope"),
        ("defense.diag_rows=0", "defense.diag_rows"),
    ],
)
def test_bad_noise_values_name_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("defense=noise", override))
    assert e.value.key == key


def test_noise_grid_experiment_sweeps_the_papers_grid(make_cfg):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=noise_grid"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    values = cfg.hydra.sweeper.params["defense.sigma"].split(",")
    assert [float(v) for v in values] == [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]
    for v in values:
        spec = validate(make_cfg("experiment=noise_grid", f"defense.sigma={v}"))
        assert isinstance(spec.defense, Noise) and spec.defense.source == "fixed"
        assert spec.defense.fixed_value == float(v)


def test_noise_pipeline_records_sigmas_fractions_and_plots(make_cfg, tmp_path):
    cfg = make_cfg(
        "defense=noise",
        "quantizer=rtn4",
        "conditions=[original,original_q]",
        "benchmark.limit=2",
        "similarity.enabled=false",
    )
    run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b")
    a, b = tmp_path / "a", tmp_path / "b"
    body = json.loads((a / "results.json").read_text())
    assert body["status"] == "complete"
    st = body["defense_stats"]["original"]
    assert st["sigma_source"] == "per_layer" and st["quantizer"] == "rtn4"
    assert st["sigma_global"] == st["sigma_hat"] > 0
    assert len(st["tensors"]) == st["n_tensors"] == 14  # 2 layers x 7 linears, lm_head skipped
    for row in st["tensors"].values():
        assert row["sigma"] == row["h"] and 0 <= row["fraction_changed"] <= 1
    assert 0.3 < st["fraction_changed"] < 0.5
    assert math.isclose(st["theory_uniform"], 0.39, abs_tol=0.02)
    assert st["theory_sigma_equals_h"] == pytest.approx(0.390452, abs=1e-6)
    assert set(st["diagnostics"]["files"]) == {
        "noise_scurve.json",
        "noise_scurve.png",
        "noise_halfwidths.png",
    }
    for f in st["diagnostics"]["files"]:
        assert (a / f).stat().st_size > 0
        assert (a / f).read_bytes() == (b / f).read_bytes()  # same config + seed: same bytes
    curve = json.loads((a / "noise_scurve.json").read_text())
    fr = [p["fraction_changed"] for p in curve["grid"]]
    assert all(y >= x for x, y in zip(fr, fr[1:])) and fr[0] < 0.01 < fr[-1]
    assert curve["points"]["per_layer"]["sigma"] is None  # σ_ℓ = h_ℓ, one per tensor
    # same config and seed: the same noise, so the same quantized model and generations
    gen = "generations/original_q.jsonl"
    assert (a / gen).read_bytes() == (b / gen).read_bytes()
    other = json.loads((b / "results.json").read_text())
    for k in ("ref_ppl", "self_ppl"):
        assert body["conditions"]["original_q"][k] == other["conditions"]["original_q"][k]
    assert other["defense_stats"] == body["defense_stats"]
    assert not list(a.glob(".*.tmp"))


@pytest.mark.slow
def test_noise_grid_sweep_runs_on_a_tiny_model(tmp_path, cache_dir):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "qexp",
            "experiment=noise_grid",
            *CLI_TINY,
            "similarity.enabled=false",
            "conditions=[original_q]",
            f"hydra.sweep.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "QEXP_CACHE_DIR": str(cache_dir)},
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    jobs = sorted(tmp_path.glob("*/results.json"))
    assert len(jobs) == 5
    applied = []
    for j in jobs:
        body = json.loads(j.read_text())
        assert body["status"] == "complete"
        st = body["defense_stats"]["original"]
        assert st["sigma_source"] == "fixed" and "diagnostics" not in st
        applied.append((st["sigma_global"], st["fraction_changed"]))
    applied.sort()
    assert [s for s, _ in applied] == [1e-5, 5e-5, 1e-4, 5e-4, 1e-3]
    fractions = [f for _, f in applied]
    assert fractions == sorted(fractions)  # more noise, more changed codes
