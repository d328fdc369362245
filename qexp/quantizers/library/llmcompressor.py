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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.oneshot import calibration_loader, ignored_linears, route_log, run_oneshot
from qexp.core.plugin import Subject
from qexp.quantizers.library.base import GPTQFamily, Library
from qexp.quantizers.library.oneshot import (
    LLMCOMPRESSOR,
    compressed_modules,
    module_formats,
    save_compressed,
    weights_read_back,
)

METHODS = ("gptq", "awq")


@dataclass
class LLMCompressorQuant(GPTQFamily):
    """`method=gptq|awq` with bits, group, sym, act-order (GPTQ) and dampening (GPTQ)."""

    library: ClassVar[Library] = LLMCOMPRESSOR
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

    def route_log(self, log: io.StringIO, path: Path) -> contextlib.AbstractContextManager:
        return route_log(log)

    def run_library(self, subject: Subject, ctx: RunContext, log: io.StringIO) -> dict:
        qmodel, info = self.run_recipe(subject, ctx, log)
        self.copy_rest(qmodel, subject.model, info.pop("checked"))
        del qmodel
        return info

    def run_recipe(
        self, subject: Subject, ctx: RunContext, log: io.StringIO
    ) -> tuple[torch.nn.Module, dict]:
        """`oneshot` with this recipe on a copy of the model on the calibration data; the
        de-quantized weights read back into `subject.model` (checked against the library's
        forward; the names of the modules checked under `checked`)."""
        model, tok = subject.model, subject.tokenizer
        seqs = self.calibration_sequences(subject, ctx)
        qmodel = copy.deepcopy(model)
        info = {"method": self.method, "calibration": self.calibration.describe()}
        run_oneshot(
            qmodel,
            ctx.cache_dir,
            tokenizer=tok,
            recipe=self.recipe(ignored_linears(model, self.quantized_linears(model))),
            dataset=calibration_loader(seqs, self.batch_size),
            num_calibration_samples=len(seqs),
            max_seq_length=self.calibration.seq_len,
            shuffle_calibration_samples=False,
        )
        checks = self.read_back(compressed_modules(qmodel), model)
        info.update(self.kernel_info(checks), formats=module_formats(qmodel), checked=list(checks))
        if ctx.save_quantized:

            def write(out: Path) -> None:
                save_compressed(qmodel, out)
                tok.save_pretrained(out)

            info.update(self.save_artifact(ctx, subject.branch, write))
        fallback = [ln for ln in log.getvalue().splitlines() if "Hessian inversion failed" in ln]
        if fallback:  # llm-compressor quietly used round-to-nearest for some modules
            info["gptq_rtn_fallback"] = fallback[-1].split(" - ", 1)[-1]
        return qmodel, info


@dataclass
class W8A8Int8(LLMCompressorQuant):
    """INT8 weights (per channel, GPTQ) and INT8 activations (per token, dynamic) after
    SmoothQuant: llm-compressor's documented W8A8 recipe. The evaluated model is the
    library's own (its forward quantizes activations as it runs), not a plain copy."""

    plain_output: ClassVar[bool] = False
    bits_allowed: ClassVar[tuple[int, ...]] = (8,)

    name: str = "w8a8_int8"
    bits: int = 8
    group_size: int = -1
    smoothing_strength: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.method == "gptq", "method", self.method, "gptq (SmoothQuant, then GPTQ)")
        check(self.group_size == -1, "group_size", self.group_size, "-1 (W8A8 is per channel)")
        check(self.sym, "sym", self.sym, "true (W8A8 weights are symmetric)")
        ok = 0.0 < self.smoothing_strength < 1.0
        check(ok, "smoothing_strength", self.smoothing_strength, "a fraction in (0, 1)")

    def recipe(self, ignore: list[str]) -> list:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=self.smoothing_strength),
            GPTQModifier(
                targets=["Linear"],
                scheme="W8A8",
                ignore=ignore,
                dampening_frac=self.damp,
                actorder="static" if self.desc_act else None,
            ),
        ]

    def run_library(
        self, subject: Subject, ctx: RunContext, log: io.StringIO
    ) -> tuple[torch.nn.Module, dict]:
        qmodel, info = self.run_recipe(subject, ctx, log)
        del info["checked"]
        info["smoothing_strength"] = self.smoothing_strength
        return weights_read_back(qmodel, subject.model), info
