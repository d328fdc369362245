"""Rotation inside the quantizer: llm-compressor's transform + quantization recipes
(its `examples/transform`): `QuIPModifier(rotations=[v, u])` or
`SpinQuantModifier(rotations=[R1, R2, R4])`, then `QuantizationModifier(scheme=PRESET,
targets="Linear", ignore=["lm_head"])`, in one data-free `oneshot`, as the library's users
write it (its transform seeds, and SpinQuant's embedding centring, included).

The evaluated model is the library's: each quantized linear holds its rotated weight as
compressed-tensors' compressor packs and unpacks it (checked against the library's weight
fake-quantization), and the online rotations (QuIP V and U, SpinQuant R4) stay forward
hooks that rotate activations at every call, as the library runs them on CPU (a GPU server
applies them with a Hadamard kernel: vLLM's, where it supports the checkpoint).

The rotation is a reparameterization, so it is measured: the same recipe without the
QuantizationModifier is applied to a copy and the fp32 max |Δlogit| against the input model
on probe windows of the reference passage goes to results.json
(`rotation.max_abs_logit_diff_fp32`); beyond `rotation_tolerance` the run stops. SpinQuant's
centring of the embedding rows is exact for LayerNorm models only: on an RMSNorm model (the
embedded SmolLM2) it drifts 1.65 and stops the run unless the tolerance is raised
(docs/quantizers.md#rotated-deployments).

Not a grid quantizer: its grid lives in the rotated basis, so the gap attack and the
interval-calibrated defenses do not take it (defense=rotate with `attack.against=[rotate]`
is the rotated-basis attack).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, List, Optional

import torch
from torch import nn

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.oneshot import ignored_linears, route_log, run_oneshot
from qexp.core.plugin import Subject
from qexp.core.rotation import check_rotation, check_sizes, modifier
from qexp.data import reference_text
from qexp.quantizers.library.base import Library, LibraryQuantizer
from qexp.quantizers.library.oneshot import (
    LLMCOMPRESSOR,
    compressed_modules,
    module_formats,
    save_compressed,
    weights_read_back,
)

SCHEMES = ("W4A16", "NVFP4A16", "MXFP4A16")  # weight-only presets the library's examples pair
DEFAULT_ROTATIONS = {"quip": ["v", "u"], "spinquant": ["R1", "R2", "R4"]}


class RotationDriftError(RuntimeError):
    """The quantizer's rotation changed the function beyond `rotation_tolerance`."""


@torch.no_grad()
def probe_logits(model: nn.Module, tok, n: int = 4, length: int = 64) -> torch.Tensor:
    """fp32 logits on `n` windows of the reference passage."""
    ids = tok(reference_text(), add_special_tokens=False).input_ids[: n * length]
    x = torch.tensor(ids[: (len(ids) // length) * length]).reshape(-1, length)
    return model(input_ids=x.to(model.device)).logits.float().cpu()


@dataclass
class RotatedScheme(LibraryQuantizer):
    """A rotation recipe of llm-compressor followed by a weight-only preset (data-free)."""

    library: ClassVar[Library] = LLMCOMPRESSOR
    saves_artifact: ClassVar[bool] = True
    plain_output: ClassVar[bool] = False

    name: str = "quip_w4a16"
    method: str = "quip"
    rotations: Optional[List[str]] = None  # null: the library example's rotations
    transform_type: str = "hadamard"
    block_size: Optional[int] = 64
    scheme: str = "W4A16"
    rotation_tolerance: float = 0.05
    kernel_tol: float = 1e-5
    bits: int = field(init=False, default=4)  # the presets' weights are 4-bit
    group_size: int = -1  # W4A16's weight group (-1: the preset's 128); FP4 groups are fixed

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method", self.method, tuple(DEFAULT_ROTATIONS))
        if self.rotations is None:
            self.rotations = list(DEFAULT_ROTATIONS[self.method])
        check_rotation("", self.method, self.rotations, self.transform_type)
        check_choice("scheme", self.scheme, SCHEMES)
        check(
            self.group_size == -1 or self.scheme == "W4A16",
            "group_size",
            self.group_size,
            f"-1 with scheme={self.scheme} (its group is the format's)",
        )
        check(
            self.rotation_tolerance > 0,
            "rotation_tolerance",
            self.rotation_tolerance,
            "a number > 0",
        )

    def check_model(self, config) -> None:
        check_sizes("quantizer.", config, self.rotations, self.transform_type, self.block_size)
        super().check_model(config)

    def quant_scheme(self):
        """compressed-tensors' QuantizationScheme: the preset, W4A16's group as configured."""
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(self.scheme, ["Linear"])
        if self.group_size != -1:
            scheme.weights = scheme.weights.model_copy(update={"group_size": self.group_size})
        return scheme

    def check_widths(self, widths: list[int]) -> None:
        """The weight groups divide every input width."""
        group = self.quant_scheme().weights.group_size
        bad = [w for w in widths if group and w % group]
        check(
            not bad,
            "quantizer",
            self.name,
            f"a model whose linear input widths are multiples of {group} ({self.scheme} "
            f"quantizes weights in groups of {group}; this model's widths: {widths})",
        )

    def route_log(self, log: io.StringIO, path: Path):
        return route_log(log)

    def rotation(self):
        """llm-compressor's rotation modifier, as its examples construct it."""
        return modifier(self.method, self.rotations, self.transform_type, self.block_size)

    def recipe(self, ignore: list[str]) -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        if self.group_size == -1:  # the preset, as the library's examples name it
            quant = QuantizationModifier(scheme=self.scheme, targets=["Linear"], ignore=ignore)
        else:
            groups = {"group_0": self.quant_scheme()}
            quant = QuantizationModifier(config_groups=groups, ignore=ignore)
        return [self.rotation(), quant]

    def rotation_drift(self, model: nn.Module, tok, ctx: RunContext) -> dict:
        """The rotation alone (the recipe without quantization) on a copy: fp32 drift."""
        rotated = copy.deepcopy(model)
        run_oneshot(rotated, ctx.cache_dir, tokenizer=tok, recipe=[self.rotation()])
        drift = float((probe_logits(rotated, tok) - probe_logits(model, tok)).abs().max())
        report = {"max_abs_logit_diff_fp32": drift, "tolerance": self.rotation_tolerance}
        if not drift <= self.rotation_tolerance:
            why = (
                " (SpinQuant centres the embedding rows, exact for LayerNorm models only)"
                if self.method == "spinquant"
                else ""
            )
            raise RotationDriftError(
                f"quantizer={self.name}: the rotation alone changed the function: max "
                f"|Δlogit| fp32 = {drift:.3g} > quantizer.rotation_tolerance = "
                f"{self.rotation_tolerance:g}{why}"
            )
        return report

    def run_library(self, subject: Subject, ctx: RunContext, log: io.StringIO):
        model, tok = subject.model, subject.tokenizer
        drift = self.rotation_drift(model, tok, ctx)
        qmodel = copy.deepcopy(model)
        ignore = ignored_linears(model, self.quantized_linears(model))
        run_oneshot(qmodel, ctx.cache_dir, tokenizer=tok, recipe=self.recipe(ignore))
        checks = self.read_back(compressed_modules(qmodel), model)
        info: dict = {
            "scheme": self.scheme,
            "weights": self.quant_scheme().weights.model_dump(mode="json", exclude_none=True),
            "rotation": {
                "method": self.method,
                "rotations": list(self.rotations),
                "transform_type": self.transform_type,
                "block_size": self.block_size,
                **drift,
            },
            **self.kernel_info(checks),
            "formats": module_formats(qmodel),
        }
        if ctx.save_quantized:

            def write(out: Path) -> None:
                save_compressed(qmodel, out)
                tok.save_pretrained(out)

            info.update(self.save_artifact(ctx, subject.branch, write))
        return weights_read_back(qmodel, model), info
