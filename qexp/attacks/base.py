"""The attack interface: A(M), applied to a freshly loaded model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from transformers import PreTrainedModel

from qexp.context import RunContext


class Attack(ABC):
    """Turns the original model M into the attacked model A(M)."""

    name: str

    @abstractmethod
    def apply(self, model: PreTrainedModel, ctx: RunContext) -> PreTrainedModel:
        """Return the attacked model (may modify `model` in place)."""


@dataclass
class NoAttack(Attack):
    """`attack=none`: A is the identity, so `attacked` is the original model."""

    name: str = "none"

    def apply(self, model: PreTrainedModel, ctx: RunContext) -> PreTrainedModel:
        return model
