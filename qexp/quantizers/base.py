"""The quantizer interface: Q, post-training quantization of a full-precision model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from qexp.context import RunContext


class Quantizer(ABC):
    """Quantizes a model; the result is evaluated like any other condition."""

    name: str
    # What the last `quantize` used (calibration source, sizes, library version, ...).
    last_info: dict = {}
    # whether `save_quantized=true` writes the library's native artifact to quantized/<branch>/
    saves_artifact: bool = False
    # whether the quantized model has the input's parameters (de-quantized weights), so the
    # stage cache can store it; False for library modules such as bitsandbytes' Linear4bit
    plain_output: bool = True

    @abstractmethod
    def quantize(self, model: PreTrainedModel, ctx: RunContext) -> PreTrainedModel:
        """Return the quantized model (may modify `model` in place)."""


@dataclass
class NoQuantizer(Quantizer):
    """`quantizer=none`: Q is the identity, so `*_q` equal their full-precision sources."""

    name: str = "none"

    def quantize(self, model: PreTrainedModel, ctx: RunContext) -> PreTrainedModel:
        return model


class GridQuantizer(Quantizer):
    """A quantizer with a deterministic grid: per-weight codes and preserving intervals."""

    skip: list[str]

    @abstractmethod
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """What the real library stores for a [out, in] weight (codes and scales, flattened)."""

    @abstractmethod
    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """The de-quantized [out, in] weight the library computes with (float32)."""

    def neighbours(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid points just below and above each weight's own (float32; the own point
        where the grid ends), with the block scales unchanged."""
        raise NotImplementedError(f"{self.name}: no neighbouring-grid-point geometry")

    @abstractmethod
    def intervals(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-weight `[lo, hi]` (float64) inside which `codes(w)` does not change."""


def target_linears(model: PreTrainedModel, skip: list[str]) -> Iterator[tuple[str, nn.Linear]]:
    """The model's nn.Linear modules, minus those whose name contains a `skip` entry."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(s in name for s in skip):
            yield name, module


GROUP_SIZES = (32, 64, 128, 256)


def group_fit(
    model: PreTrainedModel, skip: list[str], group_size: int
) -> tuple[list[int], list[int], list[int]]:
    """Input widths of the target linears, those `group_size` does not divide, and the
    GROUP_SIZES that divide them all."""
    widths = sorted({m.in_features for _, m in target_linears(model, skip)})
    bad = [w for w in widths if w % group_size]
    ok = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    return widths, bad, ok
