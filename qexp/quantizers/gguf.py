"""GGUF legacy block types through the `gguf` package's own quantize/dequantize (numpy).

Weights of every targeted linear layer are quantized to the block format and read back
de-quantized (what llama.cpp computes with), blocks of 32 along each row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from gguf.quants import quantize as gguf_quantize
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.quantizers.base import GridQuantizer
from qexp.quantizers.intervals import GGUF_LEVELS, gguf_intervals

BLOCK = 32
# bytes per 32-block and offset of the codes (after the fp16 scale d and, for *_1, min m)
LAYOUT = {"q8_0": (34, 2), "q4_0": (18, 2), "q4_1": (20, 4), "q5_0": (22, 2), "q5_1": (24, 4)}


def _blocks(w: torch.Tensor, qtype: str) -> np.ndarray:
    """The raw blocks gguf-py writes for a [out, in] weight (in a multiple of 32)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(
            f"in_features {w.shape[-1]} is not a multiple of the GGUF block size {BLOCK}"
        )
    t = getattr(GGMLQuantizationType, qtype.upper())
    return gguf_quantize(w.detach().float().cpu().numpy(), t)


def gguf_fake_quant(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """De-quantized GGUF weights, same shape and dtype as `w`."""
    t = getattr(GGMLQuantizationType, qtype.upper())
    return torch.from_numpy(dequantize(_blocks(w, qtype), t).copy()).to(w.dtype)


@dataclass
class GGUFQuant(GridQuantizer):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (the `gguf` package has no k-quant quantizer)."""

    name: str = "gguf_q4_0"
    qtype: str = "q4_0"
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    def audit_default(self) -> bool:
        """Q4_0, the legacy GGUF type most 4-bit files use."""
        return self.qtype == "q4_0"

    def __post_init__(self) -> None:
        check_choice("qtype", self.qtype, tuple(GGUF_LEVELS))

    def check_widths(self, widths: list[int]) -> None:
        bad = [w for w in widths if w % BLOCK]
        check(
            not bad,
            "quantizer",
            self.name,
            f"a model whose linear input widths are multiples of the GGUF block {BLOCK} "
            f"(this one has {bad})",
        )

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        layers = list(self.quantized_linears(subject.model))
        for name, lin in tqdm(layers, desc=self.name, disable=not ctx.progress, leave=False):
            try:
                new = gguf_fake_quant(lin.weight, self.qtype)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            lin.weight.copy_(new.to(lin.weight.device))
        return StageResult(subject.model)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return gguf_fake_quant(w.detach().float().cpu(), self.qtype)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The raw GGUF blocks (scales and packed codes) the `gguf` package writes."""
        return torch.from_numpy(_blocks(w, self.qtype).copy())

    def weight_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Per-weight codes unpacked from the raw blocks (layouts of gguf/quants.py)."""
        size, off = LAYOUT[self.qtype]
        b = _blocks(w, self.qtype).reshape(-1, size)
        if self.qtype == "q8_0":
            codes = b[:, off:].view(np.int8).astype(np.int32)
        else:
            high = None
            if self.qtype in ("q5_0", "q5_1"):  # 4 bytes of 5th bits, element j = bit j
                high = np.unpackbits(b[:, off : off + 4], axis=1, bitorder="little")
                high = high.astype(np.int32)
                off += 4
            qs = b[:, off : off + 16].astype(np.int32)  # j: low nibble, j + 16: high nibble
            codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
            if high is not None:
                codes = codes | (high << 4)
        return torch.from_numpy(np.ascontiguousarray(codes)).reshape(w.shape)

    def intervals(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preserving intervals of a [out, in] weight under this block type."""
        return gguf_intervals(w, self.qtype)
