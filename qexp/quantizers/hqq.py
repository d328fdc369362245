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
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Any, List

import torch
from tqdm.auto import tqdm

from qexp.context import RunContext
from qexp.errors import ConfigError, check, check_choice
from qexp.plugin import StageResult, Subject
from qexp.quantizers.base import GROUP_SIZES, Quantizer, model_widths, require_group_fit
from qexp.quantizers.readback import copy_checked, relative_error

EXTRA = "pip install 'qexp[hqq]' (hqq 0.2.8; DISABLE_CUDA=1 skips its CUDA extension)"


@dataclass
class HQQQuant(Quantizer):
    """`bits` (2, 3, 4, 8) per group of `group_size` input weights, scale and zero point."""

    name: str = "hqq4"
    bits: int = 4
    group_size: int = 64
    kernel_tol: float = 1e-5
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (2, 3, 4, 8))
        check(
            self.group_size in GROUP_SIZES,
            "group_size",
            self.group_size,
            "one of " + ", ".join(map(str, GROUP_SIZES)),
        )

    def check_model(self, config: Any) -> None:
        if importlib.util.find_spec("hqq") is None:
            raise ConfigError("quantizer", self.name, f"another quantizer, or install: {EXTRA}")
        super().check_model(config)

    def check_widths(self, widths: list[int]) -> None:
        """hqq groups the flattened weight: a group must not straddle two rows."""
        require_group_fit(widths, self.group_size, "hqq", per_channel=False)

    def library_config(self) -> dict:
        """hqq's quantization config (`BaseQuantizeConfig`)."""
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size)

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        from hqq.core.quantize import HQQBackend, HQQLinear

        model = subject.model
        self.check_widths(model_widths(model, self.skip))
        HQQLinear.set_backend(HQQBackend.PYTORCH)  # hqq's default; the others need CUDA
        cfg = self.library_config()
        gen = torch.Generator().manual_seed(ctx.seed)
        layers = list(self.quantized_linears(model))
        worst = 0.0
        for name, lin in tqdm(layers, desc=self.name, disable=not ctx.progress, leave=False):
            w = lin.weight
            q = HQQLinear(lin, cfg, del_orig=False, compute_dtype=w.dtype, device=str(w.device))
            deq = q.dequantize()
            x = torch.randn(4, lin.in_features, generator=gen).to(w)
            ref = x @ deq.T + (lin.bias if lin.bias is not None else 0)
            rel = relative_error(ref, q(x))
            worst = max(worst, rel)
            copy_checked(lin, deq, None, rel, self.kernel_tol, name, "hqq")
            del q
        info = {
            "library": f"hqq {importlib.metadata.version('hqq')}",
            "bits": self.bits,
            "group_size": self.group_size,
            "modules": len(layers),
            "kernel_vs_dequant_max_rel_err": worst,
        }
        return StageResult(model, info)
