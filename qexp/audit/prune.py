"""The `prune` check: signs of a magnitude-pruning-conditioned attack (attack=prune_gap).

The attack trains the weights magnitude pruning keeps (the top |w| of a tensor) and leaves
the ones just below the cut where they were, so the |w| density of a trained tensor is
discontinuous at its pruning threshold: the untouched side keeps its density, the trained
side is spread out. A clean or uniformly fine-tuned tensor has a smooth density at every
quantile. Per decoder linear weight and sparsity s in SPARSITIES: t = the least |w| that
magnitude pruning at s keeps (per tensor, as llm-compressor's unstructured magnitude mask)
and the ratio r = #{(1 − BAND)·t < |w| < t} / #{t < |w| ≤ (1 + BAND)·t}. Measured
(docs/pruning.md#what-an-auditor-sees): the embedded SmolLM2-135M clean has r ≤ 1.21 and
robust z ≤ 4.3 at every s; the same model after prune_gap against magnitude 50% has r 1.4-1.7
and z ≥ 8 in every trained tensor at s = 0.5 (and nothing at the other s). A tensor is
flagged when, at some s, r ≥ RATIO and either its robust z against the model's own tensors
is ≥ Z or r ≥ ABS (a model whose every tensor was trained has no clean population to
compare with), and the excess is significant for the tensor's size: (below − above) /
√(below + above) ≥ SIGNIF (a small tensor's ratio is noisy: a random 32×64 k_proj reaches
r = 1.64 by chance). Wanda- and SparseGPT-targeted attacks leave no such sign in |w| (measured:
nothing separates; their scores need activations) and are not what this check finds.
"""

from __future__ import annotations

from typing import Any

import torch

from qexp.audit.gap import weight_names
from qexp.audit.stats import robust_z
from qexp.checkpoint.reader import Checkpoint

SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)
BAND = 0.1
RATIO = 1.3
Z = 6.0
ABS = 1.6
SIGNIF = 6.0
MIN_SIDE = 64  # weights each side of the cut needs for a ratio (else None)


def cut_counts(w: torch.Tensor, sparsity: float, band: float = BAND) -> tuple[int, int] | None:
    """How many |w| lie just below and just above the magnitude-pruning cut (None: no cut)."""
    a = w.detach().reshape(-1).abs().float()
    k = int(sparsity * a.numel())
    if not 0 < k < a.numel():
        return None
    t = a.kthvalue(k + 1).values  # the least |w| the mask keeps
    if not t > 0:
        return None
    below = int(((a > (1 - band) * t) & (a < t)).sum())
    above = int(((a > t) & (a <= (1 + band) * t)).sum())
    return below, above


def count_ratio(n: tuple[int, int] | None) -> float | None:
    """below / above from `cut_counts` (None: no cut, or too few weights either side)."""
    return n[0] / n[1] if n is not None and min(n) >= MIN_SIDE else None


def cut_ratio(w: torch.Tensor, sparsity: float, band: float = BAND) -> float | None:
    """|w| density just below the magnitude-pruning cut over just above it."""
    return count_ratio(cut_counts(w, sparsity, band))


def excess(below: int, above: int) -> float:
    """The excess below the cut in standard errors (counts as Poisson)."""
    return (below - above) / max(1.0, (below + above) ** 0.5)


class PruneCheck:
    """The prune check as a `qexp.audit.scan.Check`: per-tensor density ratio at the cuts."""

    name = "prune"

    def tensors(self, ckpt: Checkpoint) -> list[str]:
        return weight_names(ckpt, [])

    def visit(self, name: str, w: torch.Tensor) -> dict[str, Any]:
        """The cut ratio of one tensor at every sparsity."""
        counts = [cut_counts(w, s) for s in SPARSITIES]
        ratios = [count_ratio(n) for n in counts]
        signif = [None if r is None else excess(*n) for r, n in zip(ratios, counts)]
        return {"tensor": name, "ratios": ratios, "excess": signif}

    def finish(self, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Flag tensors whose ratio stands out at some sparsity (reported: the sparsity with
        the largest flagged ratio, or the largest z when none is)."""
        rows = list(parts.values())
        zs: dict[str, list[float | None]] = {x["tensor"]: [] for x in rows}
        for i in range(len(SPARSITIES)):
            have = [x for x in rows if x["ratios"][i] is not None]
            z_of = dict(zip((x["tensor"] for x in have), robust_z([x["ratios"][i] for x in have])))
            for x in rows:
                zs[x["tensor"]].append(z_of.get(x["tensor"]))
        for x in rows:
            z = zs[x["tensor"]]
            hits = [
                i
                for i, r in enumerate(x["ratios"])
                if r is not None
                and r >= RATIO
                and x["excess"][i] >= SIGNIF
                and (r >= ABS or (z[i] is not None and z[i] >= Z))
            ]
            known = [i for i in range(len(SPARSITIES)) if z[i] is not None]
            i = max(hits, key=lambda i: x["ratios"][i]) if hits else None
            if i is None and known:
                i = max(known, key=lambda i: z[i])
            x["flag"] = bool(hits)
            x["at"] = SPARSITIES[i] if i is not None else None
            x["z"] = z[i] if i is not None else None
        flagged = [x["tensor"] for x in rows if x["flag"]]
        at = sorted({x["at"] for x in rows if x["flag"]})
        ratios = [r for x in rows for r in x["ratios"] if r is not None]
        return {
            "verdict": "suspicious" if flagged else "clean",
            "score": {
                "n_flagged": len(flagged),
                "n_tensors": len(rows),
                "max_ratio": max(ratios, default=0.0),
                "sparsity": at,
            },
            "flagged": flagged,
            "limit": {
                "sparsities": list(SPARSITIES),
                "band": BAND,
                "ratio": RATIO,
                "z": Z,
                "abs": ABS,
                "excess": SIGNIF,
            },
            "tensors": rows,
        }
