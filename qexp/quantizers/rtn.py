"""Round-to-nearest weight quantization per group of input channels (fake-quantized).

Asymmetric: scale s = (max - min) / (2^b - 1), zero z = round(-min / s), codes
q = clamp(round(w / s) + z, 0, 2^b - 1), ŵ = (q - z) s. Symmetric: s = absmax / (2^(b-1) - 1),
q = clamp(round(w / s), -2^(b-1) + 1, 2^(b-1) - 1), ŵ = q s. Groups run along the input
dimension; a last group shorter than `group_size` gets its own scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

import torch
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.quantizers.base import GridQuantizer
from qexp.quantizers.intervals import rtn_intervals


def rtn_fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """De-quantized RTN weights, same shape and dtype as `w` ([out, in])."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    pad = (-in_f) % g
    x = w.float()
    if pad:  # repeating the last column leaves the last group's min/max/absmax unchanged
        x = torch.cat([x, x[:, -1:].expand(out_f, pad)], dim=1)
    x = x.reshape(out_f, -1, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
        deq = torch.clamp(torch.round(x / s), -qmax, qmax) * s
    else:
        qmax = 2**bits - 1
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s = ((hi - lo) / qmax).clamp_min(1e-12)
        z = torch.round(-lo / s)
        deq = (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s
    return deq.reshape(out_f, -1)[:, :in_f].to(w.dtype)


@dataclass
class RTN(GridQuantizer):
    """Round-to-nearest, per group along the input dimension, weights only."""

    name: str = "rtn4"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    has_neighbours: ClassVar[bool] = True
    keeps_hooks: ClassVar[bool] = True  # weights rounded in place

    def audit_default(self) -> bool:
        """4-bit asymmetric groups of 128: the weight-only round-to-nearest baseline."""
        return self.bits == 4 and self.group_size == 128 and not self.symmetric

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (2, 3, 4, 5, 6, 8))
        check(
            self.group_size == -1 or self.group_size >= 2,
            "group_size",
            self.group_size,
            "-1 (one group per row) or an integer >= 2",
        )

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        layers = list(self.quantized_linears(subject.model))
        for _, lin in tqdm(layers, desc=f"{self.name}", disable=not ctx.progress, leave=False):
            lin.weight.copy_(rtn_fake_quant(lin.weight, self.bits, self.group_size, self.symmetric))
        return StageResult(subject.model)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return rtn_fake_quant(w.detach().float(), self.bits, self.group_size, self.symmetric)

    def neighbours(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_f, in_f = w.shape
        g = in_f if self.group_size == -1 else self.group_size
        pad = (-in_f) % g
        x = w.detach().float()
        if pad:
            x = torch.cat([x, x[:, -1:].expand(out_f, pad)], dim=1)
        x = x.reshape(out_f, -1, g)
        if self.symmetric:
            qmin, qmax = -(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1
            s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
            z = torch.zeros_like(s)
        else:
            qmin, qmax = 0, 2**self.bits - 1
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            s = ((hi - lo) / qmax).clamp_min(1e-12)
            z = torch.round(-lo / s)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        own = (q - z) * s
        rmin, rmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)

        def at(k: torch.Tensor) -> torch.Tensor:
            v = (torch.clamp(k, qmin, qmax) - z) * s
            # a point outside the group's [min, max] would reset the scale: not reachable
            v = torch.where((v >= rmin) & (v <= rmax), v, own)
            return v.reshape(out_f, -1)[:, :in_f]

        return at(q - 1), at(q + 1)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The de-quantized weights (one-to-one with the integer codes and group scales)."""
        return rtn_fake_quant(w, self.bits, self.group_size, self.symmetric)

    def weight_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Grid index k = round(ŵ / s) of every weight, ŵ = `codes(w)`, s its group's scale.

        k = q - z is the grid point ŵ = k s. The stored q also moves with the zero point z,
        which noise on a group's min can shift by one for the whole group while leaving every
        value where it was, so k is what "the code changed" means here (and what `intervals`
        bound).
        """
        out_f, in_f = w.shape
        g = in_f if self.group_size == -1 else self.group_size
        pad = (-in_f) % g

        def groups(t: torch.Tensor) -> torch.Tensor:
            t = t.float()
            if pad:
                t = torch.cat([t, t[:, -1:].expand(out_f, pad)], dim=1)
            return t.reshape(out_f, -1, g)

        x, deq = groups(w), groups(self.codes(w))
        if self.symmetric:
            s = x.abs().amax(-1, keepdim=True) / (2 ** (self.bits - 1) - 1)
        else:
            s = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**self.bits - 1)
        k = torch.round(deq.double() / s.clamp_min(1e-12).double())
        return k.reshape(out_f, -1)[:, :in_f].to(torch.int32)

    def intervals(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preserving intervals of a [out, in] weight (in_features a multiple of the group)."""
        return rtn_intervals(w, self.bits, self.group_size, self.symmetric)
