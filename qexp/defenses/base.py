"""The defense interface: D, applied before the quantizer Q."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

from qexp.context import RunContext
from qexp.plugin import Plugin, StageResult, Subject
from qexp.quantizers.base import Quantizer


class Defense(Plugin, ABC):
    """Transforms a full-precision model before quantization; may read the quantizer.

    `info` of the result (sigmas, fractions changed, ...) goes to results.json
    `defense_stats.<branch>`.
    """

    # whether D(M) computes the same function as M (the pipeline then measures the drift and
    # records it as defense_stats.<branch>.function_preservation)
    preserves_function: ClassVar[bool] = False

    def preservation_tolerance(self) -> Optional[float]:
        """Max fp32 |Δlogit| allowed on the probe batch, or None to skip the measurement."""
        return None

    def preservation_tolerance_bf16(self) -> Optional[float]:
        """Max bf16 |Δlogit| allowed as well (0.0: bit-identical), or None for no bf16 limit."""
        return None

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
