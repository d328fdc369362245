"""GGUF legacy block types through the `gguf` package's own quantize/dequantize (numpy).

Weights of every targeted linear layer are quantized to the block format and read back
de-quantized (what llama.cpp computes with), blocks of 32 along each row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from gguf.quants import quantize as gguf_quantize
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from qexp.context import RunContext
from qexp.errors import check_choice
from qexp.quantizers.base import GridQuantizer, target_linears
from qexp.quantizers.intervals import GGUF_LEVELS, gguf_intervals


def gguf_fake_quant(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """De-quantized GGUF weights, same shape and dtype as `w`."""
    t = getattr(GGMLQuantizationType, qtype.upper())
    x = w.detach().float().cpu().numpy()
    return torch.from_numpy(dequantize(gguf_quantize(x, t), t).copy()).to(w.dtype)


@dataclass
class GGUFQuant(GridQuantizer):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (the `gguf` package has no k-quant quantizer)."""

    name: str = "gguf_q4_0"
    qtype: str = "q4_0"
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        check_choice("qtype", self.qtype, tuple(GGUF_LEVELS))

    @torch.no_grad()
    def quantize(self, model: PreTrainedModel, ctx: RunContext) -> PreTrainedModel:
        layers = list(target_linears(model, self.skip))
        for name, lin in tqdm(layers, desc=self.name, disable=not ctx.progress, leave=False):
            if lin.weight.shape[1] % 32:
                raise ValueError(
                    f"{name}: in_features {lin.weight.shape[1]} is not a "
                    "multiple of the GGUF block size 32"
                )
            lin.weight.copy_(gguf_fake_quant(lin.weight, self.qtype).to(lin.weight.device))
        return model

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return gguf_fake_quant(w.detach().float().cpu(), self.qtype)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The raw GGUF blocks (scales and packed codes) the `gguf` package writes."""
        t = getattr(GGMLQuantizationType, self.qtype.upper())
        return torch.from_numpy(gguf_quantize(w.detach().float().cpu().numpy(), t).copy())

    def intervals(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preserving intervals of a [out, in] weight under this block type."""
        return gguf_intervals(w, self.qtype)
