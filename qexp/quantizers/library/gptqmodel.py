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
import importlib.metadata
import importlib.util
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, List, Optional

import torch

from qexp.core.context import RunContext, available_cores
from qexp.core.errors import check, check_choice
from qexp.core.io import atomic_dir, atomic_write_text
from qexp.core.plugin import StageResult, Subject
from qexp.quantizers.base import (
    Quantizer,
    check_group_size,
    model_widths,
    require_group_fit,
    require_library,
)
from qexp.quantizers.calib import Calibration
from qexp.quantizers.library.base import copy_checked, copy_rest, relative_error

if TYPE_CHECKING:
    from transformers import PreTrainedModel

METHODS = ("gptq", "awq", "gguf")
GGUF_KQUANTS = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
EXTRA = "pip install 'qexp[gptq]' (GPTQModel 7.6)"


def _env() -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(available_cores()))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@dataclass
class GPTQModelQuant(Quantizer):
    """`method=gptq|awq` (bits, group, sym, act-order, damp) or `method=gguf` (k-quant type)."""

    name: str = "gptq4"
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp: float = 0.01
    gguf_type: Optional[str] = None
    batch_size: int = 4
    kernel_tol: float = 0.02
    skip: List[str] = field(default_factory=lambda: ["lm_head"])
    calibration: Calibration = field(default_factory=Calibration)

    saves_artifact: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if self.method == "gguf":
            check_choice("gguf_type", self.gguf_type, GGUF_KQUANTS)
        else:
            check_choice("bits", self.bits, (2, 3, 4, 8))
            check_group_size(self.group_size, per_channel=True)
            check(0.0 < self.damp < 1.0, "damp", self.damp, "a fraction in (0, 1)")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.kernel_tol > 0, "kernel_tol", self.kernel_tol, "a number > 0")
        check(
            self.skip == ["lm_head"],
            "skip",
            self.skip,
            "[lm_head] (GPTQModel quantizes every decoder linear and never lm_head here)",
        )
        require_library("gptqmodel", self.name, EXTRA)

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

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        model, tok = subject.model, subject.tokenizer
        _env()
        self.check_widths(model_widths(model, self.skip))
        seqs = self.calibration.sequences(model, tok, ctx.seed)
        calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in seqs]
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".gptqmodel-") as tmp:
            src, dst = Path(tmp) / "fp", Path(tmp) / "quantized"
            model.save_pretrained(src, safe_serialization=True)
            tok.save_pretrained(src)
            log_file = f"logs/gptqmodel_{subject.branch}.log"
            with self._library_log(ctx.run_dir / log_file):
                from gptqmodel import BACKEND, GPTQModel

                kernel = {
                    "gptq": BACKEND.TORCH,
                    "awq": BACKEND.AWQ_TORCH,
                    "gguf": BACKEND.GGUF_TORCH,
                }[self.method]
                qm = GPTQModel.load(str(src), self.library_config(), device="cpu", backend=kernel)
                qm.quantize(calib, batch_size=self.batch_size, backend=kernel)
                qm.save(str(dst))
                del qm
                # the saved artifact, loaded as a user would, with the library's CPU kernel
                qm = GPTQModel.load(str(dst), device="cpu", backend=kernel)
            checks = self._read_back(qm.model, model)
            del qm
            if ctx.save_quantized:
                with atomic_dir(ctx.run_dir / "quantized" / subject.branch) as out:
                    shutil.copytree(dst, out, dirs_exist_ok=True)
        info = {
            "library": f"gptqmodel {importlib.metadata.version('gptqmodel')}",
            "method": self.method,
            "calibration": self.calibration.describe(),
            "modules": len(checks),
            "kernel_vs_dequant_max_rel_err": max(checks.values()),
        }
        if ctx.save_quantized:
            info["artifact"] = str(Path("quantized") / subject.branch)
        return StageResult(model, info, [log_file])

    def check_widths(self, widths: list[int]) -> None:
        """AWQ needs every in_features to be a multiple of the group (GPTQ pads, AWQ refuses)."""
        if self.method != "awq" or self.group_size == -1:
            return
        require_group_fit(widths, self.group_size, "AWQ", per_channel=True)

    @staticmethod
    @contextlib.contextmanager
    def _library_log(path: Path):
        """Send GPTQModel's very verbose console output, and the per-processor log files it
        writes to `./logs/` by default, into the run dir's logs/."""
        from gptqmodel.looper import loop_processor

        loop_processor._PROJECT_LOG_DIR = path.parent  # private, 7.6: a cwd-relative Path
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            atomic_write_text(path, log.getvalue())

    def _read_back(self, qmodel: torch.nn.Module, model: PreTrainedModel) -> dict[str, float]:
        """Copy the quantized model into `model`: de-quantized weights, each checked against
        the library's kernel, and every other parameter (AWQ rescales the norms before it)."""
        errs: dict[str, float] = {}
        g = torch.Generator().manual_seed(0)
        quantized = set()
        for name, mod in qmodel.named_modules():
            w = _dequantized(mod)
            if w is None:
                continue
            quantized.add(name)
            lin = model.get_submodule(name)
            x = torch.randn(4, lin.in_features, generator=g)
            y_lib = mod(x.to(_dtype(mod))).float().reshape(4, -1)
            bias = None if getattr(mod, "bias", None) is None else mod.bias.float()
            scored = []
            for cand in (w, w.T):
                if cand.shape == lin.weight.shape:
                    y = torch.nn.functional.linear(x, cand, bias)
                    scored.append((relative_error(y, y_lib), cand))
            if not scored:
                raise RuntimeError(f"{name}: de-quantized shape {tuple(w.shape)} does not fit")
            rel, best = min(scored, key=lambda t: t[0])
            copy_checked(lin, best, bias, rel, self.kernel_tol, name, "GPTQModel")
            errs[name] = rel
        copy_rest(qmodel, model, quantized, "GPTQModel")
        return errs


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
