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
import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.plugin import Subject
from qexp.quantizers.library.base import GPTQFamily, Library, ReadBack

METHODS = ("gptq", "awq")
INSTALL = "pip install 'qexp[llmcompressor]' (llm-compressor 0.14)"
LOG_FORMAT = "{time:HH:mm:ss.SSS} | {name}:{function} | {level} - {message}"


@dataclass
class LLMCompressorQuant(GPTQFamily):
    """`method=gptq|awq` with bits, group, sym, act-order (GPTQ) and dampening (GPTQ)."""

    library: ClassVar[Library] = Library(
        "llmcompressor",
        INSTALL,
        "llm-compressor",
        ("llmcompressor", "compressed-tensors"),
        "llmcompressor",
    )
    bits_allowed: ClassVar[tuple[int, ...]] = (4, 8)
    group_fit_why: ClassVar[str] = " (it refuses groups that split a row; SmolLM2-135M needs 64)"

    name: str = "gptq4_llmc"

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        super().__post_init__()
        check(
            not (self.desc_act and self.method == "awq"),
            "desc_act",
            self.desc_act,
            "false with method=awq (act-order is a GPTQ option)",
        )
        check(
            "lm_head" in self.skip and all(isinstance(s, str) and s for s in self.skip),
            "skip",
            self.skip,
            "a list of module-name substrings that includes lm_head (tied to the embeddings)",
        )

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

    @contextlib.contextmanager
    def route_log(self, log: io.StringIO, path: Path) -> Iterator[None]:
        """llm-compressor's loguru messages (INFO and up, per-module GPTQ metrics) into `log`:
        its first import warns (no accelerator) and installs a console handler, replaced by
        one to `log` for the duration."""
        from llmcompressor.logger import LoggerConfig, configure_logger
        from loguru import logger

        configure_logger(LoggerConfig(console_log_level=None))
        sink = logger.add(log, level="INFO", format=LOG_FORMAT, colorize=False)
        try:
            yield
        finally:
            logger.remove(sink)
            configure_logger(LoggerConfig())  # the library's default: console, INFO

    def run_library(self, subject: Subject, ctx: RunContext, log: io.StringIO) -> dict:
        model, tok = subject.model, subject.tokenizer
        seqs = self.calibration_sequences(subject, ctx)
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
        info = {"method": self.method, "calibration": self.calibration.describe()}
        with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".llmcompressor-") as tmp:
            # oneshot re-reads the config from `name_or_path` to refuse pre-quantized models
            qmodel.config.save_pretrained(tmp)
            qmodel.config.name_or_path = tmp
            with _cpu_safe():
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
                checks = self.read_back(self._modules(qmodel, device), model)
                self.copy_rest(qmodel, model, checks)
                info.update(self.kernel_info(checks))
                if ctx.save_quantized:
                    qmodel.config.name_or_path = model.config.name_or_path

                    def write(out: Path, qm: torch.nn.Module = qmodel) -> None:
                        qm.save_pretrained(out, save_compressed=True)
                        tok.save_pretrained(out)

                    info.update(self.save_artifact(ctx, subject.branch, write))
        del qmodel
        fallback = [ln for ln in log.getvalue().splitlines() if "Hessian inversion failed" in ln]
        if fallback:  # llm-compressor quietly used round-to-nearest for some modules
            info["gptq_rtn_fallback"] = fallback[-1].split(" - ", 1)[-1]
        return info

    def _modules(self, qmodel: torch.nn.Module, device: torch.device) -> Iterator[ReadBack]:
        """Each quantized module's weight, packed and unpacked by compressed-tensors' own
        compressor (as `save_pretrained(save_compressed=True)` and a loader do)."""
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.utils import get_direct_state_dict

        for name, mod in qmodel.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            fmt = scheme.format or infer_module_format(type(mod), scheme)
            compressor = BaseCompressor.get_value_from_registry(getattr(fmt, "value", fmt))
            packed = compressor.compress(get_direct_state_dict(mod), scheme)
            w = compressor.decompress(packed, scheme)["weight"].float()
            bias = None if mod.bias is None else mod.bias.float()
            yield ReadBack(name, mod, [w], bias, mod.weight.dtype)


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
