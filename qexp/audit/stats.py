"""Small robust statistics shared by the checks."""

from __future__ import annotations

import math

import torch

MAD_TO_SIGMA = 1.4826


def robust_z(values: list[float]) -> list[float | None]:
    """(x - median) / (1.4826 · MAD) over the population; None for populations under 8
    (too small for a median/MAD scale). A zero MAD becomes the smallest positive spread."""
    if len(values) < 8:
        return [None] * len(values)
    t = torch.tensor(values, dtype=torch.float64)
    med = t.median()
    mad = float((t - med).abs().median()) * MAD_TO_SIGMA
    mad = max(mad, 1e-12 * max(1.0, abs(float(med))))
    return [float(v) for v in (t - med) / mad]


def median(values: list[float]) -> float:
    """Median (lower middle for even counts, like torch.median)."""
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else math.nan
