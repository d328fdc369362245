"""The uncertainty of a run's numbers: a 95% interval on every metric measured over items,
and paired comparisons of the conditions a paper reports (qexp/core/stats.py computes).

Per-item values come from the records of a condition (generations/<condition>.jsonl):
- a rate counts a boolean field of every record: the benchmark's `rates`
  (accuracy <- correct, injection_rate <- injected, pass_at_1 <- passed, ...) and
  retrieval_at_1 <- retrieved; Wilson interval, exact McNemar between conditions;
- a mean over items reads the record field of the same name (cos_sim, bertscore_f1,
  max_repeat_3, seq_rep_4); percentile bootstrap, paired bootstrap between conditions;
- self_ppl = exp(Σ nll / Σ n_new_tokens) over the records; bootstrap over items;
- ref_ppl on the fixed reference text, and benchmark=ppl's ppl on its text: bootstrap over
  blocks of REF_BLOCK tokens (adjacent tokens are not independent; blocks are the unit that
  is resampled).
Comparisons need the same items in the same order on both sides (checked by id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qexp.core import stats

# (condition, baseline): the attack's effect in full precision, quantization's effect on
# the original, and the attack's effect once quantized
PAIRS = (("attacked", "original"), ("original_q", "original"), ("attacked_q", "original_q"))
MEANS = ("cos_sim", "bertscore_f1", "max_repeat_3", "seq_rep_4")
SHARED_RATES = {"retrieval_at_1": "retrieved"}
REF_BLOCK = 128


def pair_name(condition: str, baseline: str) -> str:
    """The key of a comparison in results.json `comparisons`."""
    return f"{condition} vs {baseline}"


@dataclass
class Evidence:
    """What one condition measured item by item."""

    metrics: dict[str, Any]
    records: list[dict]
    ref_nll: list[float]  # the reference text's per-token NLL (ref_ppl)
    bench_nll: list[float] = field(default_factory=list)  # a perplexity benchmark's (ppl)

    @property
    def ids(self) -> list[Any]:
        return [r.get("id") for r in self.records]

    def field(self, name: str) -> list[Any] | None:
        """Every record's `name`, or None when a record lacks it."""
        if not self.records or any(name not in r for r in self.records):
            return None
        return [r[name] for r in self.records]

    def texts(self) -> dict[str, list[float]]:
        """The perplexity metrics of whole texts and their per-token NLLs."""
        return {"ref_ppl": self.ref_nll, "ppl": self.bench_nll}


def blocks(nll: list[float]) -> tuple[list[float], list[int]]:
    """Token NLLs summed per block of REF_BLOCK tokens, and each block's token count."""
    starts = range(0, len(nll), REF_BLOCK)
    return [sum(nll[i : i + REF_BLOCK]) for i in starts], [
        len(nll[i : i + REF_BLOCK]) for i in starts
    ]


def _rates(rates: dict[str, str]) -> dict[str, str]:
    return {**rates, **SHARED_RATES}


def intervals(ev: Evidence, rates: dict[str, str], seed: int) -> dict[str, dict]:
    """A 95% interval for each metric of `ev` measured over items (see the module doc)."""
    out: dict[str, dict] = {}
    for metric, name in _rates(rates).items():
        values = ev.field(name)
        if metric in ev.metrics and values is not None:
            out[metric] = stats.rate_interval(values)
    for metric in MEANS:
        values = ev.field(metric)
        if metric in ev.metrics and values is not None:
            out[metric] = stats.mean_interval(values, seed)
    nll, tokens = ev.field("nll"), ev.field("n_new_tokens")
    if "self_ppl" in ev.metrics and nll is not None and tokens is not None:
        out["self_ppl"] = stats.ppl_interval(nll, tokens, seed)
    for metric, nll in ev.texts().items():
        if metric in ev.metrics and nll:
            out[metric] = {**stats.ppl_interval(*blocks(nll), seed), "unit": "token block"}
    return out


def compare(a: Evidence, b: Evidence, rates: dict[str, str], seed: int) -> dict[str, dict]:
    """a − b for every metric both measured on the same items (ref_ppl: the same text)."""
    out: dict[str, dict] = {}
    texts = b.texts()
    for metric, nll in a.texts().items():
        if nll and len(nll) == len(texts[metric]):
            out[metric] = stats.paired_ppl(*blocks(nll), *blocks(texts[metric]), seed)
    if not a.records or a.ids != b.ids:
        return out
    for metric, name in _rates(rates).items():
        x, y = a.field(name), b.field(name)
        if metric in a.metrics and metric in b.metrics and x is not None and y is not None:
            out[metric] = stats.mcnemar(x, y)
    for metric in MEANS:
        x, y = a.field(metric), b.field(metric)
        if x is not None and y is not None:
            out[metric] = stats.paired_mean(x, y, seed)
    nx, tx, ny, ty = (e.field(f) for e in (a, b) for f in ("nll", "n_new_tokens"))
    if "self_ppl" in a.metrics and "self_ppl" in b.metrics and None not in (nx, tx, ny, ty):
        out["self_ppl"] = stats.paired_ppl(nx, tx, ny, ty, seed)
    return out


def format_value(value: Any, interval: dict | None = None) -> str:
    """`0.333 [0.22, 0.47]`: a number with its interval, where it has one."""
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if interval and interval.get("lo") is not None and interval.get("hi") is not None:
        lo, hi = interval["lo"], interval["hi"]
        text += f" [{lo:.3g}, {hi:.3g}]"
    return text
