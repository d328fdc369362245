"""The defense interface: D, applied before the quantizer Q."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from transformers import PreTrainedModel

from qexp.context import RunContext
from qexp.quantizers.base import Quantizer


class Defense(ABC):
    """Transforms a full-precision model before quantization; may read the quantizer."""

    name: str
    # What the last `apply` did (sigmas, fractions changed, ...); goes to results.json.
    last_stats: dict = {}

    @abstractmethod
    def apply(
        self, model: PreTrainedModel, quantizer: Quantizer, ctx: RunContext
    ) -> PreTrainedModel:
        """Return the defended model (may modify `model` in place)."""


@dataclass
class NoDefense(Defense):
    """`defense=none`: D is the identity."""

    name: str = "none"

    def apply(
        self, model: PreTrainedModel, quantizer: Quantizer, ctx: RunContext
    ) -> PreTrainedModel:
        return model
