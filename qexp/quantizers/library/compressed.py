"""The formats vLLM and SGLang serve, through llm-compressor into compressed-tensors: FP8,
NVFP4 and MXFP4 (docs/quantizers.md#serving-formats).

`format` names one of llm-compressor's preset schemes, applied as its users write it:
`oneshot(model, recipe=QuantizationModifier(scheme=PRESET, targets=["Linear"],
ignore=[...]))`, data-free except NVFP4 (W4A4), whose static activation global scale is
calibrated on `calibration`. All these weight formats are deterministic given the weights:

- `fp8` (FP8_DYNAMIC): FP8 E4M3 weights, one scale per output row (absmax / 448);
  activations FP8 per token, dynamic;
- `fp8_block` (FP8_BLOCK): FP8 E4M3 weights, one scale per 128×128 block (zero-padded at
  the edges); activations FP8 per group of 128, dynamic;
- `nvfp4a16` / `nvfp4` (NVFP4A16 / NVFP4): FP4 E2M1 elements in blocks of 16 along a row,
  each block scale FP8 E4M3 under a per-tensor FP32 global scale 448·6 / absmax, the global
  absmax shared across fused layers (q/k/v, gate/up: llm-compressor's `FUSED_LAYER_NAMES`,
  what vLLM requires); `nvfp4` quantizes activations the same way (global scale calibrated,
  block scales dynamic);
- `mxfp4a16` / `mxfp4` (MXFP4A16 / MXFP4): FP4 E2M1 elements in blocks of 32 with a
  power-of-two E8M0 block scale; `mxfp4` quantizes activations the same way, dynamically;
- `mxfp8a16` / `mxfp8` (MXFP8A16 / MXFP8): the same with FP8 E4M3 elements;
- `fp8a16`: the `fp8` checkpoint as vLLM runs it on GPUs without FP8 compute (compute
  capability below 8.9: FP8 Marlin, weights only, activations in 16 bits).

Weights are read back through compressed-tensors' own compressor (as `save_pretrained(
save_compressed=True)` packs them and a loader unpacks them) and checked against the
library's forward. Weight-only formats are copied into the plain model; formats that
quantize activations are evaluated as the library's model (its forward fake-quantizes the
activations on CPU in the run's dtype; a GPU kernel such as vLLM's CUTLASS FP8/FP4 GEMM
accumulates differently, docs/quantizers.md says where).

The grid methods compute a tensor's scales with the library's own functions (the weight
observer's min/max, `generate_gparam`, `calculate_qparams`) and its codes with
`quantize`, in the weight's dtype; the intervals evaluate the library's rounding
(`round_to_quantized_type_args` of `x / scale`) on the weight's lattice. The per-tensor
methods take the NVFP4 global absmax of the tensor alone unless given the fused group's;
the gap attack's boxes (`prepare`) use the fused groups of the model.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import nn

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.oneshot import calibration_loader, ignored_linears, route_log, run_oneshot
from qexp.core.plugin import Subject
from qexp.quantizers.base import Boxes, GridQuantizer, pin_ties
from qexp.quantizers.intervals import grid_intervals, signed_zero
from qexp.quantizers.library.base import CalibratedQuantizer, Library
from qexp.quantizers.library.oneshot import (
    LLMCOMPRESSOR,
    compressed_modules,
    module_formats,
    save_compressed,
    stored_bytes,
    weights_read_back,
)

# qexp's option name -> llm-compressor's preset scheme
PRESETS = {
    "fp8": "FP8_DYNAMIC",
    "fp8_block": "FP8_BLOCK",
    "nvfp4a16": "NVFP4A16",
    "nvfp4": "NVFP4",
    "mxfp4a16": "MXFP4A16",
    "mxfp4": "MXFP4",
    "mxfp8a16": "MXFP8A16",
    "mxfp8": "MXFP8",
    "fp8a16": "FP8_DYNAMIC",  # the same checkpoint, evaluated weights only
}
WEIGHT_ONLY = ("nvfp4a16", "mxfp4a16", "mxfp8a16", "fp8a16")
# presets that quantize activations, evaluated weights only: how vLLM runs them on hardware
# without the format's compute
AS_WEIGHT_ONLY = {
    "fp8a16": "weights only: vLLM's FP8 Marlin kernel on GPUs below compute capability 8.9 "
    "runs this FP8_DYNAMIC checkpoint with 16-bit activations",
}
CALIBRATED = ("nvfp4",)  # a static activation scale: oneshot needs data


def weight_args(fmt: str):
    """compressed-tensors' QuantizationArgs of the preset's weights."""
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(PRESETS[fmt], ["Linear"]).weights


def value_table(args) -> torch.Tensor:
    """The sorted values an element can take (FP8 E4M3 or FP4 E2M1, within ±max)."""
    if args.num_bits == 8:
        v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        v = v.float()
        v = v[torch.isfinite(v)]
    else:
        half = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        v = torch.cat([-half, half])
    return torch.unique(v)  # sorted, -0 and +0 once


def per_element(t: torch.Tensor, shape: torch.Size, args) -> torch.Tensor:
    """A per-block tensor ([out, groups], [out, 1] or [row blocks, column blocks]) spread
    over the weight's elements."""
    from compressed_tensors.quantization import QuantizationStrategy as S

    if args.strategy in (S.GROUP, S.TENSOR_GROUP):
        return t.repeat_interleave(args.group_size, 1)
    if args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        return t.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: shape[0], : shape[1]]
    return t.expand(shape)


@dataclass
class Params:
    """A tensor's quantization parameters as llm-compressor computes and stores them."""

    scale: torch.Tensor  # per block, in the weight's dtype (the module's weight_scale)
    zero_point: torch.Tensor
    global_scale: Optional[torch.Tensor]  # float32 [1] (NVFP4) or None
    amax: torch.Tensor  # per block absmax, in the weight's dtype

    def effective(self) -> torch.Tensor:
        """The scale the library divides by: scale / global scale (its own arithmetic)."""
        return self.scale if self.global_scale is None else self.scale / self.global_scale


@dataclass
class CompressedFormat(CalibratedQuantizer, GridQuantizer):
    """An FP8 / NVFP4 / MXFP4 / MXFP8 preset of llm-compressor, weights only (`nvfp4a16`,
    `mxfp4a16`, `mxfp8a16`, `fp8a16`): a grid, evaluated as a plain model with the
    de-quantized weights."""

    library: ClassVar[Library] = LLMCOMPRESSOR
    saves_artifact: ClassVar[bool] = True
    has_neighbours: ClassVar[bool] = True
    formats: ClassVar[tuple[str, ...]] = WEIGHT_ONLY

    name: str = "nvfp4a16"
    format: str = "nvfp4a16"
    kernel_tol: float = 1e-5
    # derived from the format (its element width; blocks are the format's), not keys
    bits: int = field(init=False, default=4)
    group_size: int = field(init=False, default=-1)
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        check_choice("format", self.format, self.formats)
        args = weight_args(self.format)
        self.bits = args.num_bits
        super().__post_init__()

    @property
    def args(self):
        """The preset's weight QuantizationArgs."""
        return weight_args(self.format)

    def check_widths(self, widths: list[int]) -> None:
        """Every input width is a multiple of the format's groups along a row: NVFP4/MXFP4
        weight blocks (the library refuses others), and activation groups (FP8-block's 128:
        its dynamic activation quantization cannot split a row). FP8 rows and 128×128
        weight blocks take any width (padded)."""
        from compressed_tensors.quantization import QuantizationStrategy as S
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(PRESETS[self.format], ["Linear"])
        for what, args in (("weights", scheme.weights), ("activations", scheme.input_activations)):
            if args is None or not args.group_size or args.strategy == S.BLOCK:
                continue
            bad = [w for w in widths if w % args.group_size]
            check(
                not bad,
                "quantizer",
                self.name,
                f"a model whose linear input widths are multiples of {args.group_size} "
                f"({self.format} quantizes {what} in groups of {args.group_size} along a row; "
                f"this model's widths: {widths})",
            )

    # ---- the stage ---------------------------------------------------------------------
    def route_log(self, log: io.StringIO, path: Path):
        return route_log(log)

    def recipe(self, ignore: list[str]) -> list:
        """llm-compressor's recipe for this preset, as its examples write it."""
        from llmcompressor.modifiers.quantization import QuantizationModifier

        preset = PRESETS[self.format]
        return [QuantizationModifier(scheme=preset, targets=["Linear"], ignore=ignore)]

    def run_library(self, subject: Subject, ctx: RunContext, log: io.StringIO):
        model, tok = subject.model, subject.tokenizer
        qmodel = copy.deepcopy(model)
        ignore = ignored_linears(model, self.quantized_linears(model))
        kwargs: dict = {"tokenizer": tok, "recipe": self.recipe(ignore)}
        info: dict = {"scheme": PRESETS[self.format]}
        if self.format in CALIBRATED:
            seqs = self.calibration_sequences(subject, ctx)
            kwargs.update(
                dataset=calibration_loader(seqs, self.batch_size),
                num_calibration_samples=len(seqs),
                max_seq_length=self.calibration.seq_len,
                shuffle_calibration_samples=False,
            )
            info["calibration"] = self.calibration.describe()
        run_oneshot(qmodel, ctx.cache_dir, **kwargs)
        checks = self.read_back(compressed_modules(qmodel), model)
        info.update(self.kernel_info(checks), formats=module_formats(qmodel))
        info["weights"] = self.args.model_dump(mode="json", exclude_none=True)
        acts = next(m for m in qmodel.modules() if hasattr(m, "quantization_scheme"))
        act_args = acts.quantization_scheme.input_activations
        info["input_activations"] = (
            None if act_args is None else act_args.model_dump(mode="json", exclude_none=True)
        )
        if self.format in AS_WEIGHT_ONLY:
            info["evaluated_as"] = AS_WEIGHT_ONLY[self.format]
        if ctx.save_quantized:

            def write(out: Path) -> None:
                save_compressed(qmodel, out)
                tok.save_pretrained(out)

            info.update(self.save_artifact(ctx, subject.branch, write))
        return self.evaluated(qmodel, info, model)

    def evaluated(self, qmodel: nn.Module, info: dict, model: nn.Module):
        """The evaluated model: weight-only formats, the plain model (weights read back)."""
        del qmodel
        return info

    # ---- the grid ------------------------------------------------------------------------
    def params(self, w: torch.Tensor, global_amax: Optional[torch.Tensor] = None) -> Params:
        """Scales as llm-compressor's weight observer computes them for `w` (its min/max per
        block, `generate_gparam` over `global_amax`, default the tensor's own absmax,
        `calculate_qparams`), stored in the weight's dtype as the module stores them."""
        from compressed_tensors.quantization import QuantizationStrategy as S
        from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
        from llmcompressor.observers.helpers import flatten_for_calibration

        args = self.args
        w = w.detach().cpu()
        obs = flatten_for_calibration(w, "weight", args)
        mn, mx = torch.amin(obs, dim=(0, -1)), torch.amax(obs, dim=(0, -1))
        gs = None
        if args.strategy == S.TENSOR_GROUP:
            g = torch.maximum(mx.max(), -mn.min()) if global_amax is None else global_amax
            g = g.to(w.dtype).reshape(1)
            gs = generate_gparam(-g, g)
        scale, zp = calculate_qparams(mn, mx, args, global_scale=gs)
        amax = torch.maximum(mn.abs(), mx.abs()).clamp_min(0)
        return Params(scale.to(w.dtype), zp, gs, amax)

    def stored(self, w: torch.Tensor, global_amax: Optional[torch.Tensor] = None) -> tuple:
        """What compressed-tensors' compressor writes for this weight (`weight_packed` or the
        FP8 `weight`, `weight_scale`, `weight_global_scale`), as `save_compressed` does: (the
        compressor, the scheme, the stored tensors)."""
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme(targets=["Linear"], weights=self.args)
        fmt = infer_module_format(nn.Linear, scheme)
        compressor = BaseCompressor.get_value_from_registry(str(getattr(fmt, "value", fmt)))
        p = self.params(w, global_amax)
        state = {"weight": w.detach().cpu(), "weight_scale": p.scale}
        state["weight_zero_point"] = p.zero_point
        if p.global_scale is not None:
            state["weight_global_scale"] = p.global_scale
        return compressor, scheme, compressor.compress(state, scheme)

    def codes(self, w: torch.Tensor, global_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The bytes of every tensor the compressor stores for the weight, flattened (FP8
        and E8M0 bytes as their bits, scales as values)."""
        return stored_bytes(self.stored(w, global_amax)[2])

    def weight_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Each weight's element value (compressed-tensors' `quantize`) as its index in the
        sorted value table."""
        from compressed_tensors.quantization.lifecycle.forward import quantize

        p = self.params(w)
        q = quantize(
            w.detach().cpu(), p.scale, p.zero_point, self.args, global_scale=p.global_scale
        )
        return torch.searchsorted(value_table(self.args), q.float().contiguous()).to(torch.int32)

    def fake_quant(
        self, w: torch.Tensor, global_amax: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The weight as the compressor de-quantizes what it stores (what a loader of the
        checkpoint computes with; NVFP4 de-quantizes to bfloat16), as float32."""
        compressor, scheme, packed = self.stored(w, global_amax)
        return compressor.decompress(packed, scheme)["weight"].float()

    def dequant_dtype(self, w: torch.Tensor) -> torch.dtype:
        """The dtype compressed-tensors de-quantizes this format to from `w`'s dtype (NVFP4:
        bfloat16, whatever the weights were)."""
        compressor, scheme, packed = self.stored(w[:1])
        return compressor.decompress(packed, scheme)["weight"].dtype

    def neighbours(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The values of the codes one below and one above each weight's, with its scales, as
        the compressor de-quantizes them (rounded to its output dtype)."""
        p = self.params(w)
        table = value_table(self.args)
        idx = self.weight_codes(w).long()
        eff = per_element(p.effective(), w.shape, self.args)
        out = self.dequant_dtype(w)

        def at(i: torch.Tensor) -> torch.Tensor:
            v = table[i.clamp(0, len(table) - 1)]
            return (v.to(eff.dtype) * eff).to(out).float()

        return at(idx - 1), at(idx + 1)

    def intervals(
        self, w: torch.Tensor, global_amax: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from compressed_tensors.quantization.quant_args import round_to_quantized_type_args
        from compressed_tensors.quantization.utils import calculate_range

        args = self.args
        x = w.detach().cpu()
        p = self.params(x, global_amax)
        qmin, qmax = calculate_range(args, x.device)
        eff = per_element(p.effective(), x.shape, args)
        zp = per_element(p.zero_point, x.shape, args)

        def code(v: torch.Tensor, q: dict) -> torch.Tensor:
            scaled = v / q["eff"]
            scaled += q["zp"].to(v.dtype)
            return signed_zero(round_to_quantized_type_args(scaled, args, qmin, qmax))

        amax = per_element(p.amax, x.shape, args)
        return grid_intervals(x, code, {"eff": eff, "zp": zp}, eff, value_table(args), amax)

    def tensor_block(self, name: str) -> int:
        """The consecutive weights along a row whose codes depend on each other: the format's
        group (NVFP4 16, MX 32), the block width (FP8-block 128), or 1 (FP8 per row)."""
        from compressed_tensors.quantization import QuantizationStrategy as S

        args = self.args
        return args.block_structure[1] if args.strategy == S.BLOCK else args.group_size or 1

    # ---- boxes with the model's fused global scales -----------------------------------
    def prepare(self, subject: Subject, ctx: RunContext) -> Boxes:
        return FusedBoxes(self, fused_absmax(subject.model, self))


def fused_absmax(model: nn.Module, q: CompressedFormat) -> dict[str, torch.Tensor]:
    """For NVFP4: each quantized weight's global absmax, over its fusion group (llm-
    compressor's `FUSED_LAYER_NAMES` siblings under one parent, all of them quantized)."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from llmcompressor.observers.helpers import FUSED_LAYER_NAMES

    if q.args.strategy != S.TENSOR_GROUP:
        return {}
    quantized = {id(m): n for n, m in q.quantized_linears(model)}
    out: dict[str, torch.Tensor] = {}
    for parent in model.modules():
        for group in FUSED_LAYER_NAMES:
            mods = [getattr(parent, n, None) for n in group]
            if any(m is None or id(m) not in quantized for m in mods):
                continue
            g = torch.stack([m.weight.detach().abs().max().cpu() for m in mods]).max()
            for m in mods:
                out[quantized[id(m)] + ".weight"] = g
    return out


class FusedBoxes(Boxes):
    """A compressed format's boxes on one model: NVFP4 tensors of a fusion group share the
    group's global absmax (pinned inside every box, so it does not move)."""

    target: CompressedFormat

    def __init__(self, target: CompressedFormat, absmax: dict[str, torch.Tensor]) -> None:
        super().__init__(target, {"nvfp4_fused_global_scale": bool(absmax)} if absmax else {})
        self.absmax = absmax

    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, g = self.target, self.absmax.get(name)
        lo, hi = q.intervals(w, g)
        return pin_ties(w, lo, hi, lambda x: q.fake_quant(x, g))

    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return self.target.codes(w, self.absmax.get(name))


@dataclass
class CompressedActivations(CompressedFormat):
    """A preset that also quantizes activations (`fp8`, `fp8_block`, `nvfp4`, `mxfp4`,
    `mxfp8`): the evaluated model is the library's own, whose forward quantizes them."""

    plain_output: ClassVar[bool] = False
    formats: ClassVar[tuple[str, ...]] = tuple(f for f in PRESETS if f not in WEIGHT_ONLY)

    name: str = "fp8"
    format: str = "fp8"

    def evaluated(self, qmodel: nn.Module, info: dict, model: nn.Module):
        return weights_read_back(qmodel, model), info
