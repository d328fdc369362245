"""Check 2, gap-attack signs: where each weight sits inside its preserving interval.

For a target grid quantizer and a weight tensor, u = (w - lo) / (hi - lo) for every weight
that does not set a block scale (hi > lo; `GridQuantizer.intervals`). Trained weights are
spread smoothly over [0, 1]; projected-descent repair (attack=gap) clamps every weight its
gradient pushes out of the box onto the box edge, lo + m (hi - lo) or hi - m (hi - lo)
(m = `box_margin`, 5% by default), so a few percent of the weights share one value of u.

Statistic per (tensor, target): a histogram of u with B + 1 bins centred on k / B
(k = 0..B; B = 20 · clamp(numel / 4000, 1, 100), so the default margin 0.05 is a bin centre);
c_k the counts, m = median_k c_k (floored at 0.5). Spike S = max c_k / m over the bins with
0 < k/B < 1 and |k/B - ½| > CENTRE. Left out of the maximum: u = 0 and 1 (weights exactly on a
rounding boundary) and u ≈ ½ (weights on or next to a grid point: a de-quantized checkpoint,
like the embedded Q4_1 model, puts mass there, and so do weights shrunk towards zero by a
needle, whose sign is check 1's); their masses are reported. Projected descent piles weights
at the box edges, away from the centre. p-value: P[Binom(n, m/n) >= max c_k],
times B (bins) and times the number of (tensor, target) tests (Bonferroni). A tensor is
flagged when S >= SPIKE_MIN and its corrected p <= ALPHA; the check is suspicious when one is.
Where the library quantizes float16/bfloat16 values (the stored dtype, or LLM.int8's cast
to float16 of a float32 checkpoint) u is dithered by ±½ ulp of that dtype first, so its
lattice does not make spikes. Robust z of S against the same module kind and target is reported too.

Large tensors are sampled: a tensor of more than `sample` weights is read in full but scored on
randomly chosen rows holding at least `sample` weights, taken in runs of 64 / gcd(in, 64)
consecutive rows so that every quantizer block stays whole (one row when the width is a
multiple of 64); the choice is seeded per tensor from the audit's seed, which
`qexp-audit` draws at random unless given (an attacker who knew the rows could keep its piles
out of them) and records. Dither noise is seeded per (tensor, target) from the same seed, so
the result does not depend on the order in which parallel workers finish.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import torch
from scipy.stats import binom

from qexp.audit.stats import robust_z
from qexp.checkpoint.reader import Checkpoint
from qexp.core.geometry import parse_name

SPIKE_MIN = 6.0
CENTRE = 0.01  # |u - 1/2| <= CENTRE is left out of the spike search
ALPHA = 1e-3
CHUNK = 1 << 18  # weights per interval computation (scratch stays small, in cache)
BLOCK_ALIGN = 64  # sampled rows hold whole blocks of this many weights (every layout here)
SAMPLE = 1 << 18  # default: weights scored per large tensor
MANTISSA = {torch.float16: 10, torch.bfloat16: 7}


def n_bins(numel: int) -> int:
    """Histogram resolution B (a multiple of 20, 20..2000)."""
    return 20 * min(max(numel // 4000, 1), 100)


def weight_names(ckpt: Checkpoint, skip: list[str]) -> list[str]:
    """2-D decoder linear weights a grid quantizer quantizes (its `skip` entries left out)."""
    out = []
    for name in ckpt.names:
        parsed = parse_name(name)
        quantized = parsed is not None and parsed[1].endswith("_weight")
        if quantized and len(ckpt.shape(name)) == 2 and not any(s in name for s in skip):
            out.append(name)
    return out


def _ulp(w: torch.Tensor) -> torch.Tensor:
    """One ulp (float64) of each value in its own dtype (float16/bfloat16)."""
    _, e = torch.frexp(w.double())
    return torch.ldexp(torch.ones(w.shape, dtype=torch.float64), (e - 1 - MANTISSA[w.dtype]))


def _dither(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """w (float64) plus uniform noise of ±½ ulp of its storage dtype (float16/bfloat16)."""
    return w.double() + (torch.rand(w.shape, generator=g, dtype=torch.float64) - 0.5) * _ulp(w)


def counts(q: Any, w: torch.Tensor, bins: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Histogram counts of u (bins + 1 centred bins) and the number of pinned weights.

    Rows are processed in chunks whose size keeps every quantizer block inside a chunk.
    """
    out_f, in_f = w.shape
    step = max(64, (CHUNK // max(in_f, 1)) // 64 * 64)
    c = torch.zeros(bins + 1, dtype=torch.int64)
    pinned = 0
    for r0 in range(0, out_f, step):
        wc = w[r0 : r0 + step]  # starts at a multiple of 64 rows: blocks stay whole
        lo, hi = q.intervals(wc)
        free = hi > lo
        x = q.library_input(wc)  # LLM.int8 quantizes float16 whatever the stored dtype
        if x.dtype in MANTISSA:  # within one ulp of its box's centre: on the grid
            reach = _ulp(x) / (hi - lo)
            centre = ((x.double() - lo) / (hi - lo) - 0.5).abs() <= reach
            x = torch.where(centre, (lo + hi) / 2, _dither(x, g))
        else:
            x = x.double()
        u = ((x - lo) / (hi - lo))[free].clamp(0, 1)
        c += torch.bincount(torch.round(u * bins).long(), minlength=bins + 1)
        pinned += int((~free).sum())
    return c, pinned


def spike_stats(c: torch.Tensor, bins: int) -> dict[str, Any]:
    """Spike score, its location and an (uncorrected over tests) p-value, from counts."""
    n = int(c.sum())
    if n == 0:
        return {"n": 0, "spike": 0.0, "p_bins": 1.0}
    m = max(float(c.float().median()), 0.5)
    eligible = c.clone()
    u = torch.arange(bins + 1, dtype=torch.float64) / bins
    eligible[(u - 0.5).abs() <= CENTRE + 1e-12] = -1
    eligible[[0, bins]] = -1
    k = int(eligible.argmax())
    top = int(c[k])
    p = float(binom.sf(top - 1, n, min(m / n, 1.0))) * bins
    return {
        "n": n,
        "bins": bins,
        "spike": top / m,
        "spike_u": k / bins,
        "spike_mass": top / n,
        "p_bins": min(1.0, p),
        "edge_mass": float(c[0] + c[bins]) / n,
        "centre_mass": float(c[(u - 0.5).abs() <= CENTRE + 1e-12].sum()) / n,
    }


def kind(name: str) -> str:
    """Module kind of a weight name (e.g. self_attn.q_proj)."""
    return re.sub(r"^.*layers\.\d+\.", "", name).removesuffix(".weight")


def _seed(*parts: Any) -> int:
    """A 63-bit seed from the audit seed and names (independent of processing order)."""
    return zlib.crc32("|".join(map(str, parts)).encode()) ^ (int(parts[0]) & (2**63 - 1))


def sample_rows(w: torch.Tensor, sample: int, seed: int, name: str) -> torch.Tensor:
    """`w`, or at least `sample` of its weights: random runs of 64 / gcd(in, 64) whole rows
    (sorted; `sample` 0 = every weight)."""
    out_f, in_f = w.shape
    run = BLOCK_ALIGN // math.gcd(in_f, BLOCK_ALIGN)
    runs = -(-out_f // run)
    take = -(-sample // (run * max(in_f, 1)))
    if sample <= 0 or take >= runs:
        return w
    g = torch.Generator().manual_seed(_seed(seed, name))
    pick = torch.randperm(runs, generator=g)[:take].sort().values
    rows = (pick[:, None] * run + torch.arange(run)).reshape(-1)
    return w[rows[rows < out_f]]


class GapCheck:
    """Check 2 as a `qexp.audit.scan.Check`: histogram counts per (tensor, target)."""

    name = "gap"

    def __init__(self, quantizers: list[Any], sample: int = SAMPLE, seed: int = 0) -> None:
        self.quantizers, self.sample, self.seed = quantizers, sample, seed
        self.work: dict[str, set[str]] = {}

    def tensors(self, ckpt: Checkpoint) -> list[str]:
        self.work = {q.name: set(weight_names(ckpt, list(q.skip))) for q in self.quantizers}
        return sorted(set().union(*self.work.values()), key=ckpt.names.index)

    def visit(self, name: str, w: torch.Tensor) -> list[dict[str, Any]]:
        """Counts (or the reason it was skipped) for each target that quantizes `name`."""
        ws = sample_rows(w, self.sample, self.seed, name)
        bins = n_bins(ws.numel())
        out = []
        for q in self.quantizers:
            if name not in self.work[q.name]:
                continue
            g = torch.Generator().manual_seed(_seed(self.seed, name, q.name))
            try:
                c, pinned = counts(q, ws, bins, g)
            except ValueError as e:
                out.append({"target": q.name, "skipped": str(e)})
                continue
            scored = ws.numel()
            out.append(
                {"target": q.name, "counts": c, "bins": bins, "pinned": pinned, "scored": scored}
            )
        return out

    def finish(self, parts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Score every (tensor, target) pair; keeps the counts of the top few for plots."""
        return report(parts, self.quantizers, self.sample, self.seed)


def report(
    parts: dict[str, list[dict[str, Any]]],
    quantizers: list[Any],
    sample: int,
    seed: int,
    keep_counts: int = 3,
) -> dict[str, Any]:
    """The gap check's report from the per-tensor counts."""
    rows: list[dict[str, Any]] = []
    hist: dict[tuple[str, str], list[int]] = {}
    skipped: list[dict[str, str]] = []
    for name, results in parts.items():
        for r in results:
            if "skipped" in r:
                skipped.append({"tensor": name, "target": r["target"], "reason": r["skipped"]})
                continue
            s = spike_stats(r["counts"], r["bins"])
            rows.append(
                {
                    "tensor": name,
                    "kind": kind(name),
                    "target": r["target"],
                    "pinned": r["pinned"],
                    "scored": r["scored"],
                    **s,
                }
            )
            hist[(name, r["target"])] = r["counts"].tolist()
    n_tests = max(len(rows), 1)
    for r in rows:
        r["p"] = min(1.0, r["p_bins"] * n_tests)
        r["flag"] = r["spike"] >= SPIKE_MIN and r["p"] <= ALPHA
    for key in {(r["kind"], r["target"]) for r in rows}:
        group = [r for r in rows if (r["kind"], r["target"]) == key]
        for r, z in zip(group, robust_z([r["spike"] for r in group])):
            r["spike_z"] = z
    flagged = [r for r in rows if r["flag"]]
    top = sorted(rows, key=lambda r: -r["spike"])
    per_target = {}
    for q in quantizers:
        rs = [r for r in rows if r["target"] == q.name]
        if rs:
            best = max(rs, key=lambda r: r["spike"])
            per_target[q.name] = {
                "max_spike": best["spike"],
                "at": best["tensor"],
                "spike_u": best.get("spike_u"),
                "min_p": min(r["p"] for r in rs),
                "n_flagged": sum(r["flag"] for r in rs),
                "n_tensors": len(rs),
            }
    overall_p = min([r["p"] for r in rows], default=1.0)
    keep = {
        f"{r['tensor']}|{r['target']}": hist[(r["tensor"], r["target"])] for r in top[:keep_counts]
    }
    return {
        "verdict": "suspicious" if flagged else "clean",
        "score": {
            "max_spike": top[0]["spike"] if top else 0.0,
            "at": f"{top[0]['tensor']} / {top[0]['target']}" if top else None,
            "p": overall_p,
            "n_flagged": len(flagged),
            "n_tests": len(rows),
        },
        "thresholds": {"spike_min": SPIKE_MIN, "alpha": ALPHA, "correction": "bonferroni"},
        "sampling": {"weights_per_tensor": sample, "seed": seed},
        "per_target": per_target,
        "flagged": [
            {k: r[k] for k in ("tensor", "target", "spike", "spike_u", "spike_mass", "p")}
            for r in flagged
        ],
        "tensors": rows,
        "skipped": skipped,
        "histograms": keep,
    }
