"""The attack interface: A(M), applied to a freshly loaded model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

from qexp.core.context import RunContext
from qexp.core.plugin import Plugin, StageResult, Subject


class Attack(Plugin, ABC):
    """Turns the original model M into the attacked model A(M).

    `info` of the result is the attack's manifest (written to attack_manifest.json).
    """

    group: ClassVar[str] = "attack"

    # whether A(M) computes the same function as M (the pipeline then measures the drift)
    preserves_function: ClassVar[bool] = False

    # whether A(M) has the loaded checkpoint's parameters (the stage cache can store it)
    plain_output: ClassVar[bool] = True

    def preservation_tolerance(self) -> Optional[float]:
        """Max fp32 |Δlogit| allowed on the probe batch, or None to skip the measurement."""
        return None

    def preservation_tolerance_bf16(self) -> Optional[float]:
        """Max bf16 |Δlogit| allowed as well (0.0: bit-identical), or None for no bf16 limit."""
        return None

    def run(self, subject: Subject, ctx: RunContext) -> StageResult:
        """The attack stage: `apply`, inside whatever an adaptive attack wraps it in."""
        return self.apply(subject, ctx)

    @abstractmethod
    def apply(self, subject: Subject, ctx: RunContext) -> StageResult:
        """Return the attacked model (may modify `subject.model` in place)."""


@dataclass
class NoAttack(Attack):
    """`attack=none`: A is the identity, so `attacked` is the original model."""

    name: str = "none"
    identity: ClassVar[bool] = True

    def apply(self, subject: Subject, ctx: RunContext) -> StageResult:
        return StageResult(subject.model)
