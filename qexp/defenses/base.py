"""The defense interface: D, applied before the quantizer Q."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import nn

from qexp.core.context import RunContext
from qexp.core.plugin import Plugin, StageResult, Subject
from qexp.quantizers.base import Quantizer


class Defense(Plugin, ABC):
    """Transforms a full-precision model before quantization; may read the quantizer.

    `info` of the result (sigmas, fractions changed, ...) goes to results.json
    `defense_stats.<branch>`.
    """

    group: ClassVar[str] = "defense"

    # whether D(M) computes the same function as M (the pipeline then measures the drift and
    # records it as defense_stats.<branch>.function_preservation)
    preserves_function: ClassVar[bool] = False

    def preservation_tolerance(self) -> Optional[float]:
        """Max fp32 |Δlogit| allowed on the probe batch, or None to skip the measurement."""
        return None

    def preservation_tolerance_bf16(self) -> Optional[float]:
        """Max bf16 |Δlogit| allowed as well (0.0: bit-identical), or None for no bf16 limit."""
        return None

    # whether D(M) has the loaded checkpoint's parameters, so the stage cache can store it
    # (and what the quantizer makes of it); False for a defense that unties embeddings or
    # attaches online transforms (rotate)
    plain_output: ClassVar[bool] = True

    # ---- what an adaptive attack (`attack.against`) may read of this defense -----------
    # the surface it exposes: "noise" (noise_sigmas), "canonical" (canonicalize_layer,
    # symmetries), "ties" (tie_threshold), "outliers" (outlier_rule, clipped); None: nothing
    surface: ClassVar[Optional[str]] = None

    def noise_sigmas(self, model: nn.Module, quantizer: Quantizer) -> dict[str, float]:
        """σ of the noise this defense would add to each quantized weight, by parameter name."""
        raise NotImplementedError(f"defense={self.name} adds no noise")

    def symmetries(self) -> frozenset[str]:
        """The reparameterization symmetries this defense maps to a canonical form."""
        return frozenset()

    def canonicalize_layer(self, layer: nn.Module, config: Any) -> None:
        """Map one decoder layer to this defense's canonical form, in place."""
        raise NotImplementedError(f"defense={self.name} has no canonical form")

    def tie_threshold(self) -> float:
        """Rounding error (a fraction of the step to the neighbouring grid point) above which
        this defense treats a weight as a near tie and may flip its rounding."""
        raise NotImplementedError(f"defense={self.name} flips no roundings")

    def outlier_rule(self) -> tuple[int, Optional[float]]:
        """(block, ratio): the per-row input blocks whose largest |w| this defense changes,
        and the max/second-max ratio that triggers it (None: every block)."""
        raise NotImplementedError(f"defense={self.name} changes no outliers")

    def clipped(self, w: Any) -> tuple[Any, Any]:
        """A weight as this defense's outlier rule leaves it, and the blocks it changed."""
        raise NotImplementedError(f"defense={self.name} changes no outliers")

    def rotate_model(self, model: nn.Module, seed: int) -> None:
        """Rotate `model` in place as this defense does with `seed`."""
        raise NotImplementedError(f"defense={self.name} rotates nothing")

    def unrotate_model(self, model: nn.Module, seed: int) -> None:
        """Undo `rotate_model(model, seed)`'s weight transforms in place."""
        raise NotImplementedError(f"defense={self.name} rotates nothing")

    @abstractmethod
    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        """Return the defended model (may modify `subject.model` in place)."""


@dataclass
class NoDefense(Defense):
    """`defense=none`: D is the identity."""

    name: str = "none"
    identity: ClassVar[bool] = True

    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        return StageResult(subject.model)
