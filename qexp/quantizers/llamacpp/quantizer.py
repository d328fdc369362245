"""GGUF k-quants, i-quants and legacy types as llama.cpp makes them (optionally with imatrix).

The user's path is `convert_hf_to_gguf.py` (weights written as F16/BF16) then
`llama-quantize [--imatrix F] model.gguf out.gguf Q4_K_M`. This quantizer follows it
tensor by tensor: each weight is cast to the converter's 16-bit type, given the type
llama.cpp's mix rules choose (qexp/quantizers/llamacpp/mix.py), encoded by llama.cpp's own
`ggml_quantize_chunk` (qexp/quantizers/llamacpp/ggml.py) with the importance matrix's column, and
read back de-quantized into the model. Rows are quantized independently, so HF's row order
(before the converter's q/k permutation) gives the same rows.

`imatrix=true` computes the importance matrix as `llama-imatrix` does: for every linear
layer but the output head, the mean over calibration tokens of each input column's squared
activation, from the model being quantized.

`save_quantized=true` writes `quantized/<branch>/model-<FTYPE>.gguf` through llama.cpp's
converter (qexp/quantizers/llamacpp/gguf_file.py) and checks that it holds the evaluated weights.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, List

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.quantizers.base import Boxes, BoxTarget, Quantizer
from qexp.quantizers.calib import Calibration
from qexp.quantizers.intervals import GGUF_LEVELS, gguf_intervals
from qexp.quantizers.llamacpp import ggml, gguf_file
from qexp.quantizers.llamacpp.mix import ARCHS, FTYPES, Tensor, block, gguf_names, type_mix

SOURCE_DTYPES = ("auto", "f16", "bf16", "f32")
# weights per sub-block (own scale/min) of the k-/i-quant types
SUB_BLOCK = {"Q2_K": 16, "Q3_K": 16, "Q6_K": 16, "Q4_K": 32, "Q5_K": 32, "IQ4_XS": 32}


@dataclass
class LlamaCppQuant(Quantizer, BoxTarget):
    """llama.cpp's `ftype` (llama-quantize's type argument) with its per-tensor mix.

    As a gap-attack target: legacy-typed tensors (Q4_0 ... Q8_0, the fallbacks) get the
    exact preserving intervals on the converter's 16-bit lattice; k-/i-quant tensors get
    Mind the Gap's heuristic box (see `tensor_box`), verified with llama.cpp by the attack.
    """

    name: str = "gguf_q4_k_m"
    ftype: str = "q4_k_m"
    imatrix: bool = False
    # the converter's --outtype: auto = bf16/f16 as the model is loaded, f16 for fp32
    source_dtype: str = "auto"
    pure: bool = False  # llama-quantize --pure: every tensor the default type
    calibration: Calibration = field(default_factory=Calibration)
    # llama.cpp picks the tensors itself (every 2-D weight but norms, the head included)
    skip: List[str] = field(default_factory=list)

    saves_artifact: ClassVar[bool] = True
    exact_boxes: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_choice("ftype", self.ftype, tuple(FTYPES))
        check_choice("source_dtype", self.source_dtype, SOURCE_DTYPES)
        check(not self.skip, "skip", self.skip, "[] (llama.cpp's own rules choose the tensors)")

    def validate_environment(self) -> None:
        """llama.cpp's quantizers (libggml-base) are built."""
        if not ggml.available():
            raise ConfigError("quantizer", self.name, "llama.cpp's quantizers: " + ggml.INSTALL)

    def check_model(self, config: Any) -> None:
        model_type = getattr(config, "model_type", None)
        check(
            model_type in ARCHS,
            "model",
            model_type,
            "a dense decoder llama.cpp's mix rules cover (model_type " + ", ".join(ARCHS) + ")",
        )

    def fingerprint(self) -> Any:
        v = ggml.version()
        return {"ggml": v["ggml"], "commit": v["commit"]}

    def source(self, w: torch.Tensor) -> np.ndarray:
        """The float32 rows llama-quantize reads for `w` (after the converter's cast)."""
        cast = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
        return w.detach().to("cpu", cast[self.source_name(w)]).float().numpy()

    def source_name(self, w: torch.Tensor) -> str:
        """The converter's output type for a weight loaded as `w.dtype`."""
        if self.source_dtype != "auto":
            return self.source_dtype
        return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(w.dtype, "f16")

    def plan(self, model: nn.Module) -> dict[str, tuple[str, str]]:
        """HF parameter name -> (GGUF name, GGML type) of every tensor llama.cpp quantizes."""
        cfg = model.config
        names = gguf_names(model, cfg)
        params = dict(model.named_parameters())
        tensors = [Tensor(g, params[n].shape[-1], params[n].dim()) for n, g in names.items()]
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        mix = type_mix(
            tensors,
            self.ftype,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            n_kv,
            imatrix=self.imatrix,
            pure=self.pure,
        )
        return {n: (g, mix[g]) for n, g in names.items() if g in mix}

    def quantized_linears(self, model: nn.Module):
        planned = {n.removesuffix(".weight") for n in self.plan(model)}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name in planned:
                yield name, module

    @torch.no_grad()
    def importance(self, subject: Subject, ctx: RunContext) -> dict[str, np.ndarray]:
        """Per-column mean squared input of every linear layer but the head (HF names)."""
        model = subject.model
        seqs = self.calibration.sequences(model, subject.tokenizer, ctx.seed)
        sums: dict[str, torch.Tensor] = {}
        counts: Counter = Counter()

        def hook(name: str):
            def fn(_m: nn.Module, args: tuple) -> None:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + (x * x).sum(0).cpu().double()
                counts[name] += x.shape[0]

            return fn

        heads = {id(model.get_output_embeddings())}
        handles = [
            m.register_forward_pre_hook(hook(f"{n}.weight"))
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in heads
        ]
        device = next(model.parameters()).device
        try:
            for s in tqdm(seqs, desc="imatrix", disable=not ctx.progress, leave=False):
                model(input_ids=torch.tensor([s], device=device))
        finally:
            for h in handles:
                h.remove()
        return {n: (sums[n] / counts[n]).float().numpy() for n in sums}

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        model = subject.model
        plan = self.plan(model)
        imatrix = self.importance(subject, ctx) if self.imatrix else {}
        with ExitStack() as stack:
            f16 = None
            if ctx.save_quantized:  # first: the converter reads the weights before quantization
                outtype = self.source_name(dict(model.named_parameters())[next(iter(plan))])
                where = ctx.run_dir / "quantized"
                f16 = stack.enter_context(gguf_file.converted(subject, where, outtype))
            info = self._quantize(model, plan, imatrix, ctx)
            if f16 is not None:
                info.update(self._save(f16, subject, plan, imatrix, ctx))
        return StageResult(model, info)

    def _quantize(
        self,
        model: nn.Module,
        plan: dict[str, tuple[str, str]],
        imatrix: dict[str, np.ndarray],
        ctx: RunContext,
    ) -> dict:
        params = dict(model.named_parameters())
        types: dict[str, str] = {}
        nbytes = nweights = 0
        for name, (gname, tname) in tqdm(
            plan.items(), desc=self.name, disable=not ctx.progress, leave=False
        ):
            p = params[name]
            rows = self.source(p).reshape(-1, p.shape[-1])
            t = ggml.gtype(tname)
            if tname in ("F16", "BF16"):  # llama.cpp's last resort: the 16-bit source kept
                deq, size = rows, rows.size * 2
            else:
                data = ggml.quantize(rows, t, imatrix.get(name))
                deq, size = ggml.read_back(data, t), data.size
            p.copy_(torch.from_numpy(np.ascontiguousarray(deq)).reshape(p.shape).to(p.dtype))
            types[gname] = tname
            nbytes += size
            nweights += rows.size
        v = ggml.version()
        return {
            "library": "llama.cpp",
            "version": f"ggml {v['ggml']}, commit {v['commit']}",
            "ftype": self.ftype.upper(),
            "source_dtype": self.source_name(params[next(iter(plan))]),
            "imatrix": self._imatrix_info(imatrix),
            "type_counts": dict(sorted(Counter(types.values()).items())),
            "bits_per_weight": round(8 * nbytes / nweights, 4),
            "tensor_types": types,
        }

    def _save(
        self,
        f16: Path,
        subject: Subject,
        plan: dict[str, tuple[str, str]],
        imatrix: dict[str, np.ndarray],
        ctx: RunContext,
    ) -> dict:
        """Encode the converter's file `f16` with this type mix, as llama-quantize does, and
        check the result against the quantized model."""
        out = ctx.run_dir / "quantized" / subject.branch / f"model-{self.ftype.upper()}.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {}
        if imatrix:  # the keys llama-quantize adds for an imatrix
            meta = {
                # llama-quantize keeps 127 characters; no imatrix file exists to name
                "quantize.imatrix.dataset": json.dumps(self.calibration.describe())[:127],
                "quantize.imatrix.entries_count": len(imatrix),
                "quantize.imatrix.chunks_count": self.calibration.samples,
            }
        gguf_file.requantize(
            f16,
            out,
            {g: t for g, t in plan.values()},
            {plan[n][0]: m for n, m in imatrix.items() if n in plan},
            self.ftype,
            meta,
            ctx.progress,
        )
        params = dict(subject.model.named_parameters())
        checked = gguf_file.check_file(out, {g: params[n] for n, (g, _) in plan.items()})
        return {
            "artifact": str(out.relative_to(ctx.run_dir)),
            "artifact_check": f"{checked} tensors de-quantize to the evaluated weights",
        }

    def _imatrix_info(self, imatrix: dict[str, np.ndarray]) -> Any:
        if not self.imatrix:
            return False
        return {
            "used": True,
            "computed_by": "qexp (llama-imatrix's statistic: mean of squared inputs per column)",
            "calibration": self.calibration.describe(),
            "tensors": len(imatrix),
        }

    # ---- gap-attack target -------------------------------------------------------------
    def prepare(self, subject: Subject, ctx: RunContext) -> LlamaCppBoxes:
        """The boxes of this model: its type mix and, with `imatrix=true`, the importance
        matrix of the model about to be boxed (the injected one): the attack assumes the
        user's imatrix equals it."""
        imatrix = self.importance(subject, ctx) if self.imatrix else {}
        assumed = "computed from the injected model on quantizer.calibration"
        assumes = {"imatrix": assumed if self.imatrix else False}
        return LlamaCppBoxes(self, self.plan(subject.model), imatrix, assumes)


class LlamaCppBoxes(Boxes):
    """llama.cpp's boxes for one model: its type mix (`plan`) and importance matrix."""

    target: LlamaCppQuant

    def __init__(
        self,
        target: LlamaCppQuant,
        plan: dict[str, tuple[str, str]],
        imatrix: dict[str, np.ndarray],
        assumes: dict,
    ) -> None:
        super().__init__(target, assumes)
        self.plan, self.imatrix = plan, imatrix

    def _type(self, name: str) -> str:
        return self.plan[name][1]

    def tensor_block(self, name: str) -> int:
        return block(self._type(name))

    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return self._encode(name, self.target.source(w).reshape(-1, w.shape[-1]))

    def _encode(self, name: str, rows: np.ndarray) -> torch.Tensor:
        t = self._type(name)
        if t in ("F16", "BF16"):
            return torch.from_numpy(rows.view(np.uint32).copy())
        return torch.from_numpy(ggml.quantize(rows, ggml.gtype(t), self.imatrix.get(name)))

    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes on the converter's lattice (float64, in the weight's own units).

        Legacy types without imatrix: the exact intervals of `gguf_intervals` on the 16-bit
        values llama-quantize reads. k-/i-quants (and legacy types with an imatrix, which
        switch to a weighted search): Mind the Gap's box, from each weight towards its own
        de-quantized value (its rounding error can only shrink), with every sub-block's
        largest and smallest weight pinned and, per super-block, the sub-blocks holding the
        largest magnitude and the smallest value pinned whole (they set the scales and mins).
        """
        t = self._type(name)
        src = torch.from_numpy(self.target.source(w)).reshape(w.shape)
        if t in ("F16", "BF16"):
            return w.double(), w.double()
        if t.lower() in GGUF_LEVELS and not self.imatrix:
            cast = {"f16": torch.float16, "bf16": torch.bfloat16}.get(self.target.source_name(w))
            lo, hi = gguf_intervals(src.to(cast) if cast else src, t.lower())
            return torch.minimum(lo, w.double()), torch.maximum(hi, w.double())
        codes = self._encode(name, src.numpy().reshape(-1, w.shape[-1]))
        deq = torch.from_numpy(ggml.read_back(codes.numpy(), ggml.gtype(t)))
        deq = deq.reshape(w.shape).double()
        x = src.double()
        lo, hi = torch.minimum(x, deq), torch.maximum(x, deq)
        sub = SUB_BLOCK.get(t, 32)
        pin = _pins(x, sub, block(t))
        lo, hi = torch.where(pin, x, lo), torch.where(pin, x, hi)
        return torch.minimum(lo, w.double()), torch.maximum(hi, w.double())


def _pins(x: torch.Tensor, sub: int, sblock: int) -> torch.Tensor:
    """Weights a k-quant box pins: each sub-block's max and min, and per super-block the
    sub-blocks of largest |x| and of smallest x, whole."""
    rows, cols = x.shape
    xs = x.reshape(rows, cols // sub, sub)
    pin = torch.zeros_like(xs, dtype=torch.bool)
    pin.scatter_(-1, xs.argmax(-1, keepdim=True), True)
    pin.scatter_(-1, xs.argmin(-1, keepdim=True), True)
    per = max(1, sblock // sub)
    if per > 1:
        sb = xs.reshape(rows, cols // sblock, per, sub)
        big = sb.abs().amax(-1).argmax(-1)  # [rows, n_super]
        low = sb.amin(-1).argmin(-1)
        whole = torch.zeros(sb.shape[:3], dtype=torch.bool)
        whole.scatter_(-1, big[..., None], True)
        whole.scatter_(-1, low[..., None], True)
        pin |= whole.reshape(rows, cols // sub)[..., None].expand_as(xs)
    return pin.reshape(rows, cols)
