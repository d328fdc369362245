"""Check 3, outlier-injection signs (attack=outlier), no reference needed.

Per decoder linear weight and block of BLOCK consecutive input weights of a row (the block
of llama.cpp's legacy types, a divisor of every group size here): the ratio r = max |w| /
second max |w| (`qexp.outliers.block_ratio`). Trained weights have r near 1 (the embedded
SmolLM2-135M: median 1.14, max 22.7 over 2.4 M blocks); outlier injection makes r = the
scale factor (hundreds) in every block of the target matrices. Feature per tensor:
`outlier_fraction`, the fraction of its blocks with r >= RATIO. A tensor is flagged when
that fraction is at least FRACTION (absolute), or when its robust z against the model's
own tensors is >= Z and the fraction is at least DEV (a handful of genuine "super weights"
stay below both). The largest ratio of each tensor is reported too.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from qexp.audit.checkpoint import Checkpoint
from qexp.audit.gap import weight_names
from qexp.audit.stats import robust_z
from qexp.outliers import block_ratio

BLOCK = 32
RATIO = 64.0
FRACTION = 0.01
Z = 8.0
DEV = 1e-3


def run(ckpt: Checkpoint, progress: bool = True) -> dict[str, Any]:
    """Score every decoder linear weight's per-block outlier ratios."""
    rows: list[dict[str, Any]] = []
    skipped = []
    for name in tqdm(weight_names(ckpt, []), desc="audit: outlier", disable=not progress):
        shape = ckpt.shape(name)
        if shape[1] % BLOCK:
            skipped.append(name)
            continue
        r = block_ratio(ckpt.get(name), BLOCK)
        rows.append(
            {
                "tensor": name,
                "outlier_fraction": float((r >= RATIO).float().mean()),
                "max_ratio": float(r.max()),
                "blocks": r.numel(),
            }
        )
    fractions = [x["outlier_fraction"] for x in rows]
    for x, z in zip(rows, robust_z(fractions)):
        x["z"] = z
        f = x["outlier_fraction"]
        x["flag"] = f >= FRACTION or (z is not None and z >= Z and f >= DEV)
    flagged = [x["tensor"] for x in rows if x["flag"]]
    return {
        "verdict": "suspicious" if flagged else "clean",
        "score": {
            "n_flagged": len(flagged),
            "n_tensors": len(rows),
            "max_outlier_fraction": max(fractions, default=0.0),
            "max_ratio": max((x["max_ratio"] for x in rows), default=0.0),
        },
        "flagged": flagged,
        "limit": {"block": BLOCK, "ratio": RATIO, "fraction": FRACTION, "z": Z, "dev": DEV},
        "tensors": rows,
        "skipped": skipped,
    }
