"""SINQ (Sinkhorn-normalised quantization, calibration-free) through the `sinq` package.

Each linear layer becomes the library's `SINQLinear`, built exactly as transformers'
`SinqConfig` integration builds it (`sinq_base_quant_config(nbits, group_size,
method="sinq")`: dual per-row/per-group scales from a Sinkhorn-style normalisation, 8-bit
auxiliary scales and zeros, 1-D tiling, axis 1; `use_unpack_kernel=True`) and fed the
layer's weight with `quantize()`. Its `dequantize()` is copied into the full-precision model
once the library's forward on a probe input matched it (within `kernel_tol`, recorded).

sinq 0.2.0 solves in float16 whenever it is handed a `torch.device` (as `SINQLinear` and
transformers do), on CPU too, and quietly uses round-to-nearest for a weight whose kurtosis
exceeds 5: the modules it did that for are recorded (`rtn_fallback`). Its wheel declares
torchaudio, torchvision, lm_eval and a Triton kernel package (gemlite) it does not import
on CPU, and installs a `sitecustomize.py` that patches transformers' from_pretrained in
every interpreter: `make setup` installs it with `--no-deps` and removes that file.

As a gap-attack target (`attack.targets=[sinq4]`) the boxes are a heuristic, as for HQQ:
sinq normalises each 64-column tile (all rows) by Sinkhorn-style column and row scales,
then rounds each group (a row of a tile) to nearest between its normalised min and max,
with an integer zero point that is then 8-bit quantized over the whole tensor's range. A
weight's box is its rounding interval in that normalised space mapped back through the
tile's scales, inside the group's range, with each group's normalised min and max pinned.
The normalisation couples the weights of a tile (its column scales follow every row, and
sinq keeps the iterate of least imbalance, a discrete choice), so the attack verifies with
sinq itself and resets what changed, a whole tile when its groups stay coupled. What it
preserves is every group's integer codes and stored zero point; the scales move with the
weights, so attacked_q is sinq's own result on the repaired model, evaluated.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qexp.quantizers.base import TensorBoxTarget
from qexp.quantizers.library.base import Library, ModuleQuantizer

log = logging.getLogger(__name__)

INSTALL = (
    "pip install --no-deps sinq==0.2.0 (its declared torchaudio/gemlite pull a CUDA torch; "
    "then remove the sitecustomize.py it puts in site-packages, as `make setup` does)"
)
KURTOSIS_THRESHOLD = 5.0  # sinq 0.2.0's optimize_weights default: above it, round-to-nearest


@dataclass
class SINQQuant(ModuleQuantizer, TensorBoxTarget):
    """`bits` per group of `group_size` input weights, dual scales, zero point per group."""

    library: ClassVar[Library] = Library("sinq", INSTALL, "sinq")
    bits_allowed: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)
    exact_boxes: ClassVar[bool] = False

    name: str = "sinq4"
    group_size: int = 64

    def validate_environment(self) -> None:
        super().validate_environment()
        if os.environ.get("SINQ_PTH_LOADED") == "1":
            log.warning(
                "sinq's sitecustomize.py patched transformers' from_pretrained in this "
                "interpreter; set SINQ_AUTO_PATCH=0 or remove site-packages/sitecustomize.py"
            )

    def library_config(self) -> dict:
        """The quant_config transformers' SinqConfig hands SINQLinear."""
        from sinq.sinqlinear_hf import sinq_base_quant_config

        return sinq_base_quant_config(
            nbits=self.bits,
            group_size=self.group_size,
            quant_zero=False,
            quant_scale=False,
            view_as_float=False,
            axis=1,
            tiling_mode="1D",
            method="sinq",
        )

    def notes(self) -> dict:
        return {"method": "sinq", "rtn_fallback": []}

    def library_module(self, name: str, lin: nn.Linear, notes: dict) -> nn.Module:
        with contextlib.redirect_stdout(io.StringIO()):  # "No gemlite installation, ..."
            from sinq.optimize import kurtosis
            from sinq.sinqlinear_hf import SINQLinear
        w = lin.weight.detach()
        solver = torch.float32 if w.device == "cpu" else torch.float16  # sinq's own test
        if float(kurtosis(w.to(solver))) > KURTOSIS_THRESHOLD:
            notes["rtn_fallback"].append(name)
        q = SINQLinear(
            in_features=lin.in_features,
            out_features=lin.out_features,
            bias=lin.bias is not None,
            quant_config=self.library_config(),
            compute_dtype=w.dtype,
            device=str(w.device),
            use_unpack_kernel=True,
        )
        q.quantize(w, bias=lin.bias)
        return q

    # ---- gap-attack target -------------------------------------------------------------
    def _encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sinq's integer codes ([out, in]) and stored (de-quantized) zero point per group,
        row-major over (row, tile), as `SINQLinear.quantize` computes them (no packing)."""
        with contextlib.redirect_stdout(io.StringIO()):
            from sinq.quantizer import Quantizer as SQ
            from sinq.quantizer import dq8

            q, meta = SQ.quantize(
                w.detach(),
                None,
                device=torch.device(w.device),  # what SINQLinear passes: the float16 solver
                compute_dtype=w.dtype,
                **self.library_config()["weight_quant_params"],
                use_unpack_kernel=True,
                bitpack=False,
            )
        return q.reshape(w.shape).to(torch.int16), dq8(meta["zero"]).float().reshape(-1, 1)

    def tensor_block(self, name: str) -> int:
        return self.group_size

    def coupled_blocks(self, name: str, bad: torch.Tensor) -> torch.Tensor:
        """Every group of a tile (one block column, all rows) with a changed group."""
        return bad.any(0, keepdim=True).expand_as(bad)

    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Integer codes, then each group's stored zero point, one row per weight row."""
        q, zero = self._encode(w)
        g = w.shape[-1] // self.group_size
        codes = q.reshape(w.shape[0], g, self.group_size).to(torch.float32)
        return torch.cat([codes, zero.reshape(w.shape[0], g, 1)], dim=-1).reshape(w.shape[0], -1)

    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each weight's rounding interval in sinq's normalised space (per tile: the
        Sinkhorn column and row scales `quantize_dual_scale_shift` computes from the float16
        weight), mapped back, inside its group's range, each group's min and max pinned."""
        from sinq.optimize import kurtosis
        from sinq.sinkhorn import sinkhorn_log

        rows, gs, top = w.shape[0], self.group_size, 2**self.bits - 1
        wh = w.detach().to(torch.float16)  # sinq's solver dtype on a torch.device
        rtn = float(kurtosis(wh)) > KURTOSIS_THRESHOLD
        lo = torch.empty(w.shape, dtype=torch.float64)
        hi = torch.empty(w.shape, dtype=torch.float64)
        for t in range(w.shape[-1] // gs):
            cols = slice(t * gs, (t + 1) * gs)
            m = wh[:, cols].float()
            norm, mu1, mu2 = sinkhorn_log(m, 16)
            if rtn:  # sinq's kurtosis gate: round-to-nearest of the tile itself
                norm, mu1, mu2 = m, torch.ones_like(mu1), torch.ones_like(mu2)
            x = norm.double()
            gmin, gmax = x.min(1, keepdim=True)[0], x.max(1, keepdim=True)[0]
            scale = (gmax - gmin).clamp(min=1e-4) / top
            zero = -torch.round(gmin / scale)
            c = torch.clamp(torch.round(x / scale + zero), 0, top)
            nlo = torch.maximum((c - 0.5 - zero) * scale, gmin)
            nhi = torch.minimum((c + 0.5 - zero) * scale, gmax)
            ends = (x == gmin) | (x == gmax)
            back = mu1.double().reshape(1, gs) * mu2.double().reshape(rows, 1)
            wt = w[:, cols].detach().double()
            lo[:, cols] = torch.where(ends, wt, torch.minimum(nlo * back, wt))
            hi[:, cols] = torch.where(ends, wt, torch.maximum(nhi * back, wt))
        return lo, hi
