"""Intervals and paired tests (qexp/core/stats.py, qexp/pipeline/uncertainty.py)."""

import math

import pytest

from qexp.core import stats
from qexp.pipeline.results import format_table
from qexp.pipeline.uncertainty import Evidence, compare, intervals


def wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson (1927), written out: the cross-check of scipy's implementation."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(16, 48), (0, 30), (40, 40), (7, 40), (27, 40)])
def test_wilson_matches_the_closed_form(k, n):
    ci = stats.wilson(k, n)
    lo, hi = wilson_closed_form(k, n)
    assert ci["lo"] == pytest.approx(lo, abs=1e-9) and ci["hi"] == pytest.approx(hi, abs=1e-9)
    assert ci["n"] == n and ci["method"] == "wilson"


def test_the_brief_example_reads_0_22_to_0_47():
    ci = stats.wilson(16, 48)  # 0.333 on 48 items
    assert (round(ci["lo"], 2), round(ci["hi"], 2)) == (0.22, 0.47)


def test_exact_mcnemar_is_a_binomial_test_on_discordant_pairs():
    a = [True] * 10 + [False] * 30
    b = [False] * 10 + [False] * 30  # a wins 10 discordant pairs, b none
    r = stats.mcnemar(a, b)
    assert r["discordant"] == [10, 0] and r["diff"] == pytest.approx(0.25)
    assert r["p"] == pytest.approx(2 * 0.5**10)
    same = stats.mcnemar(a, a)
    assert same["p"] == 1.0 and same["diff"] == 0.0
    # 6 vs 4 discordant: far from significant
    c = [True] * 6 + [False] * 4 + [True] * 5
    d = [False] * 6 + [True] * 4 + [True] * 5
    assert stats.mcnemar(c, d)["p"] == pytest.approx(0.75390625)
    with pytest.raises(ValueError):
        stats.mcnemar([True], [True, False])


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = [0.1, 0.9, 0.4, 0.35, 0.8, 0.05, 0.6, 0.7]
    one, two = stats.mean_interval(values, 0), stats.mean_interval(values, 0)
    assert one == two
    mean = sum(values) / len(values)
    assert one["lo"] < mean < one["hi"] and one["n"] == 8
    assert stats.mean_interval(values, 1) != one  # another seed, other resamples
    assert stats.mean_interval([0.5, None, 0.5], 0)["lo"] == 0.5  # undefined items left out


def test_paired_bootstrap_finds_a_consistent_shift_and_not_noise():
    base = [0.1 * i for i in range(30)]
    shifted = [v + 0.2 for v in base]
    r = stats.paired_mean(shifted, base, 0)
    assert r["diff"] == pytest.approx(0.2) and r["p"] < 0.01 and r["lo"] > 0
    wiggle = [v + (0.01 if i % 2 else -0.01) for i, v in enumerate(base)]
    assert stats.paired_mean(wiggle, base, 0)["p"] > 0.5


def test_perplexity_interval_resamples_items_with_their_tokens():
    nll, tok = [10.0, 20.0, 30.0, 5.0, 12.0], [5, 6, 7, 3, 4]
    ci = stats.ppl_interval(nll, tok, 0)
    point = math.exp(sum(nll) / sum(tok))
    assert ci["lo"] < point < ci["hi"]
    r = stats.paired_ppl(nll, tok, [x + 1 for x in nll], tok, 0)
    assert r["diff"] < 0 and r["hi"] < 0


def test_seed_summary_is_the_t_interval():
    s = stats.seed_summary([0.3, 0.35, 0.4])
    assert s["mean"] == pytest.approx(0.35) and s["sd"] == pytest.approx(0.05)
    half = 4.302652729911275 * 0.05 / math.sqrt(3)  # t(0.975, 2)
    assert s["hi"] - s["mean"] == pytest.approx(half) and s["n"] == 3
    assert stats.seed_summary([0.3])["lo"] is None


def test_intervals_and_comparisons_from_records():
    recs = [{"id": i, "correct": i < 12, "nll": 3.0, "n_new_tokens": 2} for i in range(40)]
    worse = [{**r, "correct": r["id"] < 2} for r in recs]
    metrics = {"accuracy": 0.3, "self_ppl": math.exp(1.5), "ref_ppl": math.exp(2.0)}
    a = Evidence(metrics, recs, [2.0] * 300)
    b = Evidence({**metrics, "accuracy": 0.05}, worse, [2.5] * 300)
    ci = intervals(a, {"accuracy": "correct"}, 0)
    assert ci["accuracy"] == stats.wilson(12, 40)
    assert ci["ref_ppl"]["n"] == 3 and ci["ref_ppl"]["unit"] == "token block"  # 128-token blocks
    cmp = compare(a, b, {"accuracy": "correct"}, 0)
    assert cmp["accuracy"]["discordant"] == [10, 0] and cmp["accuracy"]["p"] < 0.01
    assert cmp["ref_ppl"]["diff"] < 0
    # a perplexity benchmark's text: the same block bootstrap as ref_ppl
    c = Evidence({"ppl": math.exp(2.0)}, [], [], [2.0 + 0.01 * (i % 7) for i in range(300)])
    assert intervals(c, {}, 0)["ppl"]["unit"] == "token block"
    assert set(compare(c, c, {}, 0)) == {"ppl"} and compare(c, c, {}, 0)["ppl"]["diff"] == 0
    # other items (ids differ): no per-item comparison, the reference text still compares
    other = Evidence(metrics, [{**r, "id": r["id"] + 100} for r in recs], [2.0] * 300)
    assert set(compare(a, other, {"accuracy": "correct"}, 0)) == {"ref_ppl"}


def test_table_prints_values_with_intervals():
    text = format_table(
        {"original": {"accuracy": 16 / 48, "n_items": 48}},
        {"original": {"accuracy": stats.wilson(16, 48)}},
    )
    assert "0.3333 [0.217, 0.475]" in text
