"""Codes a weight perturbation changes under a grid quantizer, counted three ways: by the real
library, by the preserving intervals, and by the closed form for weights uniform in their
intervals. Shared by defense=noise and defense=launder (docs/defenses.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qexp.quantizers.base import GridQuantizer, Quantizer

# ---------------------------------------------------------------- closed form


def expected_flip_fraction(ratio: float | torch.Tensor) -> float | torch.Tensor:
    """P(code changes) for a weight uniform in its interval [-h, h] plus N(0, σ²); ratio = σ/h.

    Given position u, the noisy weight stays iff -h <= u + ε <= h:
        P(stay | u) = Φ((h - u)/σ) - Φ((-h - u)/σ).
    Averaging over u ~ U(-h, h) and substituting t = (±h - u)/σ, with a = 2h/σ and
    ∫Φ(t) dt = tΦ(t) + φ(t):
        ∫_{-h}^{h} Φ((h-u)/σ) du  = σ [aΦ(a) + φ(a) - φ(0)]
        ∫_{-h}^{h} Φ((-h-u)/σ) du = σ [aΦ(-a) + φ(0) - φ(a)]
    so P(stay) = (2Φ(a) - 1) - (2/a)(φ(0) - φ(a)) and
        P(change) = 2(1 - Φ(a)) + (2/a)(φ(0) - φ(a)).
    σ = h (a = 2): 0.3905; σ = 2.57 h: 0.704; σ → 0: 0; σ → ∞: 1.
    """
    scalar = not torch.is_tensor(ratio)
    r = torch.as_tensor(ratio, dtype=torch.float64)
    a = 2.0 / r  # r = 0 -> a = inf -> 0
    phi0 = 1.0 / math.sqrt(2 * math.pi)
    phi_a = torch.exp(-0.5 * a * a) * phi0
    tail = 2.0 * torch.special.ndtr(-a)
    out = torch.where(a > 0, tail + (2.0 / a) * (phi0 - phi_a), torch.ones_like(a))
    out = torch.where(torch.isinf(a), torch.zeros_like(a), out)
    return float(out) if scalar else out


# ---------------------------------------------------------------- geometry and codes


def quantized_weights(model: nn.Module, quantizer: Quantizer) -> Iterator[tuple[str, nn.Parameter]]:
    """(`<module>.weight`, parameter) of every linear layer the quantizer quantizes."""
    for name, lin in quantizer.quantized_linears(model):
        yield f"{name}.weight", lin.weight


@dataclass
class Geometry:
    """Preserving intervals of one weight tensor, which weights are not pinned, their h."""

    lo: torch.Tensor
    hi: torch.Tensor
    movable: torch.Tensor  # hi > lo
    half_widths: torch.Tensor  # h = (hi - lo) / 2 of the non-pinned weights, flattened

    @classmethod
    def of(cls, quantizer: GridQuantizer, w: torch.Tensor) -> Geometry:
        lo, hi = quantizer.intervals(w.detach().cpu())
        movable = hi > lo
        return cls(lo, hi, movable, ((hi - lo) / 2)[movable])


class ChangeCounter:
    """Codes changed among non-pinned weights: real library, interval route, uniform theory."""

    def __init__(self) -> None:
        self.n = self.library = self.intervals = 0
        self.theory = 0.0

    def add(
        self,
        quantizer: GridQuantizer,
        geo: Geometry,
        clean_codes: torch.Tensor,
        noisy: torch.Tensor,
        sigma: float,
    ) -> dict:
        """Count one tensor (clean geometry and codes vs. `noisy`); return its own fractions."""
        mov = geo.movable
        n = int(mov.sum())
        # the value the library quantizes: a box's edges are values of that lattice
        x = quantizer.library_input(noisy).double()
        out = ((x < geo.lo) | (x > geo.hi)) & mov
        by_intervals = int(out.sum())
        changed = quantizer.weight_codes(noisy.detach().cpu()) != clean_codes
        by_library = int((changed & mov).sum())
        h = geo.half_widths
        theory = float(expected_flip_fraction(sigma / h).sum()) if n else 0.0
        self.n += n
        self.intervals += by_intervals
        self.library += by_library
        self.theory += theory
        return {
            "n": n,
            "fraction_changed_intervals": by_intervals / n if n else None,
            "fraction_changed": by_library / n if n else None,
            "theory_uniform": theory / n if n else None,
        }

    def summary(self) -> dict:
        """Fractions over every counted weight (absent when nothing was counted)."""
        if not self.n:
            return {}
        return {
            "n_weights_measured": self.n,
            "fraction_changed_intervals": self.intervals / self.n,
            "theory_uniform": self.theory / self.n,
            "fraction_changed_library": self.library / self.n,
        }
