"""Uncertainty of a number measured on a finite set of items (scipy does the arithmetic).

- a rate (k of n items): Wilson score interval (`scipy.stats.binomtest(...).proportion_ci`);
- a mean over items (cosine, BERTScore, repetition): percentile bootstrap over items;
- a perplexity exp(Σ nll / Σ tokens): bootstrap over items (or token blocks), resampling the
  pairs (nll, tokens) together;
- two conditions on the same items: exact McNemar (a binomial test on the discordant pairs)
  for rates, a paired bootstrap of the difference for the others.

Every bootstrap is seeded: the same values and seed give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def wilson(k: int, n: int, level: float = LEVEL) -> dict[str, Any]:
    """The Wilson score interval of k successes in n trials."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return {"lo": float(ci.low), "hi": float(ci.high), "method": "wilson", "n": int(n)}


def rate_interval(values: Sequence[bool], level: float = LEVEL) -> dict[str, Any]:
    """Wilson interval of a rate given per item as booleans."""
    return wilson(sum(bool(v) for v in values), len(values), level)


def _bootstrap(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    seed: int,
    level: float,
) -> tuple[float, float, np.ndarray]:
    from scipy.stats import bootstrap

    res = bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return float(ci.low), float(ci.high), res.bootstrap_distribution


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _ppl(nll: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(np.sum(nll, axis=axis) / np.sum(tokens, axis=axis))


def _interval(lo: float, hi: float, method: str, n: int) -> dict[str, Any]:
    return {"lo": _finite(lo), "hi": _finite(hi), "method": method, "n": n}


def mean_interval(values: Sequence[float], seed: int, level: float = LEVEL) -> dict[str, Any]:
    """Percentile bootstrap interval of the mean over items (undefined items left out)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:  # one value, or all equal: the interval is the point
        m = float(x.mean()) if len(x) else math.nan
        return _interval(m, m, "bootstrap", len(x))
    lo, hi, _ = _bootstrap((x,), _mean, seed, level)
    return _interval(lo, hi, "bootstrap", len(x))


def ppl_interval(
    nll: Sequence[float], tokens: Sequence[int], seed: int, level: float = LEVEL
) -> dict[str, Any]:
    """Bootstrap interval of exp(Σ nll / Σ tokens), resampling (nll, tokens) units."""
    keep = [(a, b) for a, b in zip(nll, tokens) if b]
    if len(keep) < 2:
        return _interval(math.nan, math.nan, "bootstrap", len(keep))
    a = np.asarray([k[0] for k in keep], dtype=np.float64)
    b = np.asarray([k[1] for k in keep], dtype=np.float64)
    lo, hi, _ = _bootstrap((a, b), _ppl, seed, level)
    return _interval(lo, hi, "bootstrap", len(keep))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of rate(a) - rate(b) on paired items (two-sided)."""
    from scipy.stats import binomtest

    if len(a) != len(b):
        raise ValueError(f"paired samples of {len(a)} and {len(b)} items")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    n = len(a)
    return {
        "diff": (only_a - only_b) / n if n else math.nan,
        "lo": None,
        "hi": None,
        "p": float(p),
        "test": "mcnemar_exact",
        "n": n,
        "discordant": [only_a, only_b],
    }


def _paired(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    seed: int,
    level: float,
) -> dict[str, Any]:
    """Paired bootstrap of a difference statistic: its interval and a two-sided p-value
    (twice the share of resampled differences on the far side of zero)."""
    point = float(statistic(*samples))
    n = len(samples[0])
    if n < 2:
        return {"diff": point, "lo": None, "hi": None, "p": 1.0, "test": "paired_bootstrap", "n": n}
    lo, hi, dist = _bootstrap(samples, statistic, seed, level)
    below, above = np.mean(dist <= 0), np.mean(dist >= 0)
    p = min(1.0, 2 * min(below, above))
    return {
        "diff": point,
        "lo": _finite(lo),
        "hi": _finite(hi),
        "p": float(p),
        "test": "paired_bootstrap",
        "n": n,
    }


def paired_mean(
    a: Sequence[float | None], b: Sequence[float | None], seed: int, level: float = LEVEL
) -> dict[str, Any]:
    """mean(a) - mean(b) over the items defined in both, paired bootstrap."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of {len(a)} and {len(b)} items")
    keep = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    x = np.asarray([k[0] for k in keep], dtype=np.float64)
    y = np.asarray([k[1] for k in keep], dtype=np.float64)

    def diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    return _paired((x, y), diff, seed, level)


def paired_ppl(
    nll_a: Sequence[float],
    tok_a: Sequence[int],
    nll_b: Sequence[float],
    tok_b: Sequence[int],
    seed: int,
    level: float = LEVEL,
) -> dict[str, Any]:
    """ppl(a) - ppl(b) on the same items (each ppl = exp(Σ nll / Σ tokens)), paired
    bootstrap over items."""
    if not len(nll_a) == len(tok_a) == len(nll_b) == len(tok_b):
        raise ValueError("paired perplexities need the same items on both sides")
    arrays = tuple(np.asarray(v, dtype=np.float64) for v in (nll_a, tok_a, nll_b, tok_b))

    def diff(na: np.ndarray, ta: np.ndarray, nb: np.ndarray, tb: np.ndarray, axis: int = -1):
        return _ppl(na, ta, axis) - _ppl(nb, tb, axis)

    return _paired(arrays, diff, seed, level)


def seed_summary(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean, sample sd, n and the t interval of the mean of runs that differ only in seed."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": n, "lo": None, "hi": None, "method": "t"}
    sd = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "lo": mean - half, "hi": mean + half, "method": "t"}
