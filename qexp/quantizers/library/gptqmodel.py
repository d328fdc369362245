"""GPTQ, AWQ and GGUF k-quants through GPTQModel (the maintained successor of auto-gptq).

The model (with its tokenizer) is written to a temporary safetensors checkpoint, loaded by
`GPTQModel.load` with the quantization config, and quantized on the calibration sequences
(qexp/quantizers/calib.py). Every quantized module's weight is then read back with the
library's own `dequantize_weight()` into the full-precision model, so evaluation runs in the
run's dtype. Each module is checked on the way: the library's own CPU kernel applied to a
probe input must match the de-quantized fp32 weights (relative error below `kernel_tol`,
recorded), so the evaluated model is the one the library would run.

On CPU GPTQModel needs `GPTQMODEL_CPU_WORKERS` (set to this job's cores) and computes in
bf16; `TORCHDYNAMO_DISABLE=1` avoids a ~1 min compile on the first forward.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch

from qexp.core.context import RunContext, available_cores
from qexp.core.errors import check_choice
from qexp.core.plugin import Subject
from qexp.quantizers.base import require_group_fit
from qexp.quantizers.library.base import GPTQFamily, Library, ReadBack

METHODS = ("gptq", "awq", "gguf")
GGUF_KQUANTS = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


def _env() -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(available_cores()))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@dataclass
class GPTQModelQuant(GPTQFamily):
    """`method=gptq|awq` (bits, group, sym, act-order, damp) or `method=gguf` (k-quant type)."""

    library: ClassVar[Library] = Library(
        "gptqmodel", "pip install 'qexp[gptq]' (GPTQModel 7.6)", "GPTQModel", log_name="gptqmodel"
    )
    fixed_skip: ClassVar[Optional[str]] = "GPTQModel quantizes every decoder linear, never lm_head"

    name: str = "gptq4"
    gguf_type: Optional[str] = None  # method=gguf: the k-quant type

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if self.method == "gguf":
            check_choice("gguf_type", self.gguf_type, GGUF_KQUANTS)
        super().__post_init__()

    def check_widths(self, widths: list[int]) -> None:
        """AWQ needs every in_features to be a multiple of the group (GPTQ pads, AWQ refuses)."""
        if self.method == "awq" and self.group_size != -1:
            require_group_fit(widths, self.group_size, "AWQ", per_channel=True)

    def library_config(self):
        """The GPTQModel quantization config."""
        _env()
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization.config import FORMAT, METHOD, GGUFConfig

        if self.method == "gguf":
            return GGUFConfig(bits=self.gguf_type)
        kw = dict(bits=self.bits, group_size=self.group_size, sym=self.sym)
        if self.method == "awq":
            return QuantizeConfig(quant_method=METHOD.AWQ, format=FORMAT.GEMM, **kw)
        return QuantizeConfig(desc_act=self.desc_act, damp_percent=self.damp, **kw)

    def route_log(self, log: io.StringIO, path: Path) -> contextlib.AbstractContextManager:
        """GPTQModel's per-processor log files (cwd-relative `./logs/` by default) go to the
        run dir's logs/."""
        from gptqmodel.looper import loop_processor

        loop_processor._PROJECT_LOG_DIR = path.parent  # private, 7.6: a cwd-relative Path
        return contextlib.nullcontext()

    def run_library(self, subject: Subject, ctx: RunContext, log: io.StringIO) -> dict:
        model, tok = subject.model, subject.tokenizer
        _env()
        seqs = self.calibration_sequences(subject, ctx)
        calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in seqs]
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".gptqmodel-") as tmp:
            src, dst = Path(tmp) / "fp", Path(tmp) / "quantized"
            model.save_pretrained(src, safe_serialization=True)
            tok.save_pretrained(src)
            from gptqmodel import BACKEND, GPTQModel

            kernel = {"gptq": BACKEND.TORCH, "awq": BACKEND.AWQ_TORCH, "gguf": BACKEND.GGUF_TORCH}
            backend = kernel[self.method]
            qm = GPTQModel.load(str(src), self.library_config(), device="cpu", backend=backend)
            qm.quantize(calib, batch_size=self.batch_size, backend=backend)
            qm.save(str(dst))
            del qm
            # the saved artifact, loaded as a user would, with the library's CPU kernel
            qm = GPTQModel.load(str(dst), device="cpu", backend=backend)
            checks = self.read_back(self._modules(qm.model), model)
            self.copy_rest(qm.model, model, checks)
            del qm
            info = {"method": self.method, "calibration": self.calibration.describe()}
            info.update(self.kernel_info(checks))
            if ctx.save_quantized:
                write = lambda out: shutil.copytree(dst, out, dirs_exist_ok=True)  # noqa: E731
                info.update(self.save_artifact(ctx, subject.branch, write))
        return info

    def _modules(self, qmodel: torch.nn.Module):
        """Each GPTQModel quantized linear, its de-quantized weight (as stored, or
        transposed) and the dtype its CPU kernel computes in."""
        for name, mod in qmodel.named_modules():
            w = _dequantized(mod)
            if w is not None:
                bias = None if getattr(mod, "bias", None) is None else mod.bias.float()
                yield ReadBack(name, mod, [w, w.T], bias, _dtype(mod))


def _dequantized(mod: torch.nn.Module) -> Optional[torch.Tensor]:
    """The float weight a GPTQModel quantized linear computes with, or None for others."""
    if hasattr(mod, "dequantize_weight"):
        return mod.dequantize_weight().float()
    if hasattr(mod, "qweight") and hasattr(mod, "qzeros") and type(mod).__name__.startswith("Awq"):
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        return dequantize_gemm(
            qweight=mod.qweight,
            qzeros=mod.qzeros,
            scales=mod.scales,
            bits=mod.bits,
            group_size=mod.group_size,
        ).float()
    return None


def _dtype(mod: torch.nn.Module) -> torch.dtype:
    for t in mod.buffers():
        if t.is_floating_point():
            return t.dtype
    return torch.float16
