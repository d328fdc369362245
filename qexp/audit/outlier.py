"""Check 3, outlier-injection signs (attack=outlier), no reference needed.

Per decoder linear weight and block of BLOCK consecutive input weights of a row (the block
of llama.cpp's legacy types, a divisor of every group size here): the ratio r = max |w| /
second max |w| (`qexp.core.blocks.block_ratio`). Trained weights have r near 1 (the embedded
SmolLM2-135M: median 1.14, max 22.7 over 2.4 M blocks); outlier injection makes r = the
scale factor (hundreds) in every block of the target matrices. Feature per tensor:
`outlier_fraction`, the fraction of its blocks with r >= RATIO. A tensor is flagged when
that fraction is at least FRACTION (absolute), or when its robust z against the model's
own tensors is >= Z and the fraction is at least DEV (a handful of genuine "super weights"
stay below both). The largest ratio of each tensor is reported too.
"""

from __future__ import annotations

from typing import Any

import torch

from qexp.audit.gap import weight_names
from qexp.audit.stats import robust_z
from qexp.checkpoint.reader import Checkpoint
from qexp.core.blocks import block_ratio

BLOCK = 32
CHUNK = 1 << 22  # weights per block-ratio computation
RATIO = 64.0
FRACTION = 0.01
Z = 8.0
DEV = 1e-3


class OutlierCheck:
    """Check 3 as a `qexp.audit.scan.Check`: per-tensor block-ratio statistics."""

    name = "outlier"

    def tensors(self, ckpt: Checkpoint) -> list[str]:
        return weight_names(ckpt, [])

    def visit(self, name: str, w: torch.Tensor) -> dict[str, Any] | None:
        """Outlier fraction and largest ratio of one tensor (None: width not divisible)."""
        if w.shape[1] % BLOCK:
            return None
        step = max(1, CHUNK // w.shape[1])  # row chunks: bounded scratch
        r = torch.cat([block_ratio(w[i : i + step], BLOCK) for i in range(0, w.shape[0], step)])
        return {
            "tensor": name,
            "outlier_fraction": float((r >= RATIO).float().mean()),
            "max_ratio": float(r.max()),
            "blocks": r.numel(),
        }

    def finish(self, parts: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
        """Flag tensors by outlier fraction, absolute and against the model's own."""
        rows = [x for x in parts.values() if x is not None]
        skipped = [n for n, x in parts.items() if x is None]
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
