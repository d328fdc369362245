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
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any, List

import torch
from tqdm.auto import tqdm

from qexp.context import RunContext
from qexp.errors import check_choice
from qexp.plugin import StageResult, Subject
from qexp.quantizers.base import (
    Quantizer,
    check_group_size,
    model_widths,
    require_group_fit,
    require_library,
)
from qexp.quantizers.readback import copy_module_checked

log = logging.getLogger(__name__)

EXTRA = (
    "pip install --no-deps sinq==0.2.0 (its declared torchaudio/gemlite pull a CUDA torch; "
    "then remove the sitecustomize.py it puts in site-packages, as `make setup` does)"
)
KURTOSIS_THRESHOLD = 5.0  # sinq 0.2.0's optimize_weights default: above it, round-to-nearest


@dataclass
class SINQQuant(Quantizer):
    """`bits` per group of `group_size` input weights, dual scales, zero point per group."""

    name: str = "sinq4"
    bits: int = 4
    group_size: int = 64
    kernel_tol: float = 1e-5
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (2, 3, 4, 5, 6, 8))
        check_group_size(self.group_size, per_channel=False)

    def check_model(self, config: Any) -> None:
        require_library("sinq", self.name, EXTRA)
        if os.environ.get("SINQ_PTH_LOADED") == "1":
            log.warning(
                "sinq's sitecustomize.py patched transformers' from_pretrained in this "
                "interpreter; set SINQ_AUTO_PATCH=0 or remove site-packages/sitecustomize.py"
            )
        super().check_model(config)

    def check_widths(self, widths: list[int]) -> None:
        """sinq groups the flattened weight: a group must not straddle two rows."""
        require_group_fit(widths, self.group_size, "sinq", per_channel=False)

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

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        model = subject.model
        self.check_widths(model_widths(model, self.skip))
        with contextlib.redirect_stdout(io.StringIO()):  # "No gemlite installation, ..."
            from sinq.optimize import kurtosis
            from sinq.sinqlinear_hf import SINQLinear
        cfg = self.library_config()
        gen = torch.Generator().manual_seed(ctx.seed)
        layers = list(self.quantized_linears(model))
        worst, fallback = 0.0, []
        for name, lin in tqdm(layers, desc=self.name, disable=not ctx.progress, leave=False):
            w = lin.weight.detach()
            solver = torch.float32 if w.device == "cpu" else torch.float16  # sinq's own test
            if float(kurtosis(w.to(solver))) > KURTOSIS_THRESHOLD:
                fallback.append(name)
            q = SINQLinear(
                in_features=lin.in_features,
                out_features=lin.out_features,
                bias=lin.bias is not None,
                quant_config=cfg,
                compute_dtype=w.dtype,
                device=str(w.device),
                use_unpack_kernel=True,
            )
            q.quantize(w, bias=lin.bias)
            rel = copy_module_checked(lin, q, gen, self.kernel_tol, name, "sinq")
            worst = max(worst, rel)
            del q
        info = {
            "library": f"sinq {importlib.metadata.version('sinq')}",
            "bits": self.bits,
            "group_size": self.group_size,
            "method": "sinq",
            "modules": len(layers),
            "rtn_fallback": fallback,
            "kernel_vs_dequant_max_rel_err": worst,
        }
        return StageResult(model, info)
