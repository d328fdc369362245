"""HQQ (half-quadratic quantization) through the `hqq` package.

Calibration-free: for every group of `group_size` consecutive input weights of a row, hqq's
proximal solver (its default: 20 iterations with early stopping, lp-norm 0.7) fits a scale
and a zero point (rounded for 4 bits), as `hqq_base_quant_config` configures it (axis 1).
Each linear layer is encoded by the library's own `HQQLinear`, the module
`AutoHQQHFModel.quantize_model` puts into a model; its `dequantize()` is copied into the
full-precision model once the library's forward on a probe input matched it (relative
error within `kernel_tol`, recorded). transformers 5.17's `HqqConfig` raises
NotImplementedError, so hqq's own API is the user's path.

hqq solves in float32 on CPU and in float16 on CUDA: GPU codes differ from CPU codes.

As a gap-attack target (`attack.targets=[hqq4]`) the boxes are a heuristic: each weight's
rounding interval at the boxed model's scale and zero point, every group's smallest and
largest weight pinned (they set the scale). The zero point is continuous (a mean over the
group after the proximal iterations) and the solver's early stopping is decided on the
whole tensor's mean error, so the attack verifies with hqq itself and what it preserves
is the integer codes and scales; the zero points move with the weights, so attacked_q is
evaluated on hqq's own result, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qexp.quantizers.base import TensorBoxTarget
from qexp.quantizers.library.base import Library, ModuleQuantizer


@dataclass
class HQQQuant(ModuleQuantizer, TensorBoxTarget):
    """`bits` (2, 3, 4, 8) per group of `group_size` input weights, scale and zero point."""

    library: ClassVar[Library] = Library(
        "hqq", "pip install 'qexp[hqq]' (hqq 0.2.8; DISABLE_CUDA=1 skips its CUDA extension)", "hqq"
    )
    exact_boxes: ClassVar[bool] = False

    name: str = "hqq4"
    group_size: int = 64

    def library_config(self) -> dict:
        """hqq's quantization config (`BaseQuantizeConfig`)."""
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size)

    def library_module(self, name: str, lin: nn.Linear, notes: dict) -> nn.Module:
        from hqq.core.quantize import HQQBackend, HQQLinear

        HQQLinear.set_backend(HQQBackend.PYTORCH)  # hqq's default; the others need CUDA
        w = lin.weight
        cfg = self.library_config()
        return HQQLinear(lin, cfg, del_orig=False, compute_dtype=w.dtype, device=str(w.device))

    # ---- gap-attack target -------------------------------------------------------------
    def _encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hqq's integer codes ([out, in]), 1/scale and zero point (per group) for `w`, as
        `HQQLinear` computes them (functional API, no bit packing)."""
        from hqq.core.quantize import Quantizer as HQQ

        params = self.library_config()["weight_quant_params"]
        q, meta = HQQ.quantize(
            w.detach(),
            device=str(w.device),
            compute_dtype=w.dtype,
            **{**params, "bitpack": False},
        )
        return q.reshape(w.shape).to(torch.int16), meta["scale"].float(), meta["zero"].float()

    def tensor_block(self, name: str) -> int:
        return self.group_size

    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Integer codes, then each group's scale, one row per weight row (group-major)."""
        q, inv_scale, _ = self._encode(w)
        g = w.shape[-1] // self.group_size
        codes = q.reshape(w.shape[0], g, self.group_size).to(torch.float32)
        scale = inv_scale.reshape(w.shape[0], g, 1)
        return torch.cat([codes, scale], dim=-1).reshape(w.shape[0], -1)

    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rounding intervals at this model's scale and zero point, inside the group's
        [min, max], with the min and max weights pinned."""
        q, inv_scale, zero = self._encode(w)
        x = w.detach().double().reshape(-1, self.group_size)
        c, s, z = q.reshape(x.shape).double(), inv_scale.double(), zero.double()
        lo, hi = (c - 0.5 - z) * s, (c + 0.5 - z) * s
        gmin, gmax = x.min(1, keepdim=True)[0], x.max(1, keepdim=True)[0]
        lo, hi = torch.maximum(lo, gmin), torch.minimum(hi, gmax)
        ends = (x == gmin) | (x == gmax)
        lo = torch.where(ends, x, torch.minimum(lo, x))
        hi = torch.where(ends, x, torch.maximum(hi, x))
        return lo.reshape(w.shape), hi.reshape(w.shape)
