"""GPTQ and AWQ through llm-compressor (vLLM's quantization library, compressed-tensors format).

A second back-end beside GPTQModel (qexp/quantizers/library/gptqmodel.py), on the same calibration
sequences (qexp/quantizers/calib.py). llm-compressor's `oneshot` runs on a deep copy of the
model with a GPTQModifier (or AWQModifier + QuantizationModifier): int weights, one scale
(and zero point when asymmetric) per `group_size` input columns. The copy then holds
compressed-tensors' quantization state (weight_scale, weight_zero_point, a patched forward
that fake-quantizes the weight). Every quantized module's weight is read back through the
library's own serialization: compressed-tensors' compressor packs it exactly as
`save_pretrained(save_compressed=True)` does and unpacks it as a loader does; the unpacked
fp32 weight must reproduce the library's own quantized forward on a probe input (relative
error below `kernel_tol`, recorded). Those weights, and every other parameter of the copy
(AWQ rescales the norms and the linears before them), are copied into the caller's model,
which never carries the library's wrappers: a plain HF model, evaluated in the run's dtype.

llm-compressor refuses group sizes that do not divide a layer's input width (SmolLM2-135M:
576 wide, so group 64, not 128); that is checked before any work. Without a GPU its AWQ
must not pin host memory (`IntermediatesCache.pin_memory` is made a no-op then).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, List

import torch

from qexp.core.context import RunContext
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

METHODS = ("gptq", "awq")
EXTRA = "pip install 'qexp[llmcompressor]' (llm-compressor 0.14)"
LOG_FORMAT = "{time:HH:mm:ss.SSS} | {name}:{function} | {level} - {message}"


@dataclass
class LLMCompressorQuant(Quantizer):
    """`method=gptq|awq` with bits, group, sym, act-order (GPTQ) and dampening (GPTQ)."""

    name: str = "gptq4_llmc"
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp: float = 0.01
    batch_size: int = 4
    kernel_tol: float = 0.02
    skip: List[str] = field(default_factory=lambda: ["lm_head"])
    calibration: Calibration = field(default_factory=Calibration)

    saves_artifact: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("bits", self.bits, (4, 8))
        check_group_size(self.group_size, per_channel=True)
        check(0.0 < self.damp < 1.0, "damp", self.damp, "a fraction in (0, 1)")
        check(
            not (self.desc_act and self.method == "awq"),
            "desc_act",
            self.desc_act,
            "false with method=awq (act-order is a GPTQ option)",
        )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.kernel_tol > 0, "kernel_tol", self.kernel_tol, "a number > 0")
        check(
            "lm_head" in self.skip and all(isinstance(s, str) and s for s in self.skip),
            "skip",
            self.skip,
            "a list of module-name substrings that includes lm_head (tied to the embeddings)",
        )
        require_library("llmcompressor", self.name, EXTRA)

    def scheme(self):
        """The compressed-tensors weight scheme: int `bits`, per group (or channel), W-only."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        per_channel = self.group_size == -1
        weights = QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.sym,
            strategy="channel" if per_channel else "group",
            group_size=None if per_channel else self.group_size,
        )
        return QuantizationScheme(targets=["Linear"], weights=weights)

    def recipe(self, ignore: list[str]) -> list:
        """The llm-compressor modifiers; `ignore` lists module names left in full precision."""
        groups = {"group_0": self.scheme()}
        if self.method == "awq":
            from llmcompressor.modifiers.quantization import QuantizationModifier
            from llmcompressor.modifiers.transform.awq import AWQModifier

            return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)]
        from llmcompressor.modifiers.gptq import GPTQModifier

        # desc_act=true is llm-compressor's "static"/"weight" act-order: columns are processed
        # by decreasing Hessian diagonal, groups stay contiguous (the format does not change)
        return [
            GPTQModifier(
                config_groups=groups,
                ignore=ignore,
                dampening_frac=self.damp,
                actorder="static" if self.desc_act else None,
            )
        ]

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        model, tok = subject.model, subject.tokenizer
        self.check_widths(model_widths(model, self.skip))
        seqs = self.calibration.sequences(model, tok, ctx.seed)
        device = next(model.parameters()).device
        data = [
            {"input_ids": torch.tensor(s), "attention_mask": torch.ones(len(s), dtype=torch.long)}
            for s in seqs
        ]
        loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size)
        ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        ignore = sorted(set(ignore) - {n for n, _ in self.quantized_linears(model)})
        qmodel = copy.deepcopy(model)
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        log_file = f"logs/llmcompressor_{subject.branch}.log"
        log_path = ctx.run_dir / log_file
        with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".llmcompressor-") as tmp:
            # oneshot re-reads the config from `name_or_path` to refuse pre-quantized models
            qmodel.config.save_pretrained(tmp)
            qmodel.config.name_or_path = tmp
            with self._library_log(log_path) as log, _cpu_safe():
                from llmcompressor import oneshot
                from llmcompressor.core import reset_session

                try:
                    oneshot(
                        model=qmodel,
                        tokenizer=tok,
                        recipe=self.recipe(ignore),
                        dataset=loader,
                        num_calibration_samples=len(seqs),
                        max_seq_length=self.calibration.seq_len,
                        shuffle_calibration_samples=False,
                    )
                finally:
                    reset_session()  # the global session would keep the copy alive
                checks = self._read_back(qmodel, model, device)
                if ctx.save_quantized:
                    qmodel.config.name_or_path = model.config.name_or_path
                    with atomic_dir(ctx.run_dir / "quantized" / subject.branch) as out:
                        qmodel.save_pretrained(out, save_compressed=True)
                        tok.save_pretrained(out)
        del qmodel
        info = {
            "library": f"llmcompressor {importlib.metadata.version('llmcompressor')}, "
            f"compressed-tensors {importlib.metadata.version('compressed-tensors')}",
            "method": self.method,
            "calibration": self.calibration.describe(),
            "modules": len(checks),
            "kernel_vs_dequant_max_rel_err": max(checks.values()),
        }
        fallback = [ln for ln in log.getvalue().splitlines() if "Hessian inversion failed" in ln]
        if fallback:  # llm-compressor quietly used round-to-nearest for some modules
            info["gptq_rtn_fallback"] = fallback[-1].split(" - ", 1)[-1]
        if ctx.save_quantized:
            info["artifact"] = str(Path("quantized") / subject.branch)
        return StageResult(model, info, [log_file])

    def check_widths(self, widths: list[int]) -> None:
        """llm-compressor refuses a group that does not divide a layer's input width."""
        if self.group_size == -1:
            return
        why = " (llm-compressor refuses groups that split a row; SmolLM2-135M needs 64)"
        require_group_fit(widths, self.group_size, "llm-compressor", per_channel=True, why=why)

    @staticmethod
    @contextlib.contextmanager
    def _library_log(path: Path):
        """Send llm-compressor's loguru messages (INFO and up, per-module GPTQ metrics) and
        the progress bars and warnings on stdout/stderr into the run dir's logs/. Yields the
        captured text buffer."""
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                # the first import warns (no accelerator) and installs a console handler:
                # replace it with one to `log` for the duration
                from llmcompressor.logger import LoggerConfig, configure_logger
                from loguru import logger

                configure_logger(LoggerConfig(console_log_level=None))
                sink = logger.add(log, level="INFO", format=LOG_FORMAT, colorize=False)
                try:
                    yield log
                finally:
                    logger.remove(sink)
                    configure_logger(LoggerConfig())  # the library's default: console, INFO
        finally:
            atomic_write_text(path, log.getvalue())

    def _read_back(
        self, qmodel: torch.nn.Module, model: PreTrainedModel, device: torch.device
    ) -> dict[str, float]:
        """Copy the quantized copy into `model`: de-quantized weights (packed and unpacked by
        compressed-tensors, checked against the library's forward) and every other parameter."""
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.utils import get_direct_state_dict

        errs: dict[str, float] = {}
        g = torch.Generator().manual_seed(0)
        quantized = set()
        for name, mod in qmodel.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            quantized.add(name)
            fmt = scheme.format or infer_module_format(type(mod), scheme)
            compressor = BaseCompressor.get_value_from_registry(getattr(fmt, "value", fmt))
            state = get_direct_state_dict(mod)
            packed = compressor.compress(state, scheme)
            w = compressor.decompress(packed, scheme)["weight"].float()
            lin = model.get_submodule(name)
            x = torch.randn(4, lin.in_features, generator=g).to(device)
            y_lib = mod(x.to(mod.weight.dtype)).float()
            bias = None if mod.bias is None else mod.bias.float()
            y = torch.nn.functional.linear(x, w.to(device), bias)
            rel = relative_error(y, y_lib)
            copy_checked(lin, w, bias, rel, self.kernel_tol, name, "llm-compressor")
            errs[name] = rel
        copy_rest(qmodel, model, quantized, "llm-compressor")
        return errs


@contextlib.contextmanager
def _cpu_safe():
    """Without an accelerator, AWQ's `IntermediatesCache.pin_memory` fails (page-locked host
    memory needs one); it only speeds up host-to-device copies, so it is skipped then."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original
