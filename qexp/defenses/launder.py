"""defense=launder: quantize and de-quantize with another quantizer before the configured one.

Every linear weight the configured quantizer quantizes (its layers minus `skip`) is replaced
by its round trip through `via`, in full precision: Q(D(M)) = Q(deq(Q_via(M))). A weight an
attacker parked just inside a preserving interval of Q is moved onto Q_via's grid, which
lands it elsewhere relative to Q's boundaries.

`via` (one of VIAS):
- `rtn`: qexp's round-to-nearest with `bits`, `group_size`, `symmetric` (validated as RTN's).
- `bnb_int8`, `bnb_nf4`, `bnb_fp4`: bitsandbytes' own quantize + de-quantize functions
  (LLM.int8 row absmax; 4-bit block 64).
- `gguf_q8_0`, `gguf_q4_0`, `gguf_q4_1`, `gguf_q5_0`, `gguf_q5_1`: gguf-py's block
  quantize + de-quantize (in_features a multiple of 32).
`bits`, `group_size` and `symmetric` are read for `rtn` only. A `via` identical to the
configured quantizer (a no-op round trip) is refused at apply time.

`last_stats`: the weight change (mean / max |Δw|, relative Frobenius norm) and, for a grid
quantizer, the fraction of its codes the laundering changed (real library, as in
`defense=noise`; pinned weights excluded).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from qexp.context import RunContext
from qexp.defenses.base import Defense
from qexp.defenses.noise import ChangeCounter, Geometry, quantized_weights, weight_codes
from qexp.errors import ConfigError, check_choice
from qexp.quantizers import RTN, BitsAndBytes, GGUFQuant, rtn_fake_quant
from qexp.quantizers.base import GridQuantizer, Quantizer
from qexp.quantizers.gguf import gguf_fake_quant
from qexp.quantizers.intervals import GGUF_LEVELS

VIAS = ("rtn", "bnb_int8", "bnb_nf4", "bnb_fp4", *(f"gguf_{q}" for q in GGUF_LEVELS))


def bnb_fake_quant(w: torch.Tensor, mode: str) -> torch.Tensor:
    """bitsandbytes quantize then de-quantize of a [out, in] weight (same shape and dtype)."""
    import bitsandbytes.functional as F

    x = w.detach().float().cpu().clone()
    if mode == "int8":
        q, scale, _ = F.int8_vectorwise_quant(x)
        deq = F.int8_vectorwise_dequant(q, scale)
    else:
        packed, state = F.quantize_4bit(x, blocksize=64, quant_type=mode)
        deq = F.dequantize_4bit(packed, state)
    return deq.reshape(w.shape).to(device=w.device, dtype=w.dtype)


@dataclass
class Launder(Defense):
    """De-quantize / re-quantize: the weights make a round trip through `via` first."""

    name: str = "launder"
    via: str = "rtn"  # rtn | bnb_int8 | bnb_nf4 | bnb_fp4 | gguf_q8_0 | gguf_q4_0 | ...
    bits: int = 8  # rtn only
    group_size: int = 64  # rtn only; -1 = one group per row
    symmetric: bool = False  # rtn only

    def __post_init__(self) -> None:
        check_choice("via", self.via, VIAS)
        if self.via == "rtn":  # RTN's own checks, keys bits / group_size
            RTN(
                name="launder_via",
                bits=self.bits,
                group_size=self.group_size,
                symmetric=self.symmetric,
            )
        if self.via.startswith("bnb_") and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "via", self.via, "rtn or gguf_*, or install the extra: pip install 'qexp[bnb]'"
            )

    def describe(self) -> dict:
        """The `via` round trip as recorded in last_stats."""
        if self.via == "rtn":
            return {
                "via": "rtn",
                "bits": self.bits,
                "group_size": self.group_size,
                "symmetric": self.symmetric,
            }
        return {"via": self.via}

    def round_trip(self, w: torch.Tensor) -> torch.Tensor:
        """`w` quantized with `via` and read back de-quantized (same shape, dtype, device)."""
        if self.via == "rtn":
            return rtn_fake_quant(w, self.bits, self.group_size, self.symmetric)
        if self.via.startswith("bnb_"):
            return bnb_fake_quant(w, self.via.removeprefix("bnb_"))
        if w.shape[1] % 32:
            raise ValueError(
                f"defense.via={self.via}: in_features {w.shape[1]} is not a multiple of the "
                "GGUF block size 32"
            )
        return gguf_fake_quant(w, self.via.removeprefix("gguf_")).to(w.device)

    def same_as(self, quantizer: Quantizer) -> bool:
        """Whether the round trip is the configured quantizer itself."""
        if isinstance(quantizer, RTN):
            mine = ("rtn", self.bits, self.group_size, self.symmetric)
            return mine == ("rtn", quantizer.bits, quantizer.group_size, quantizer.symmetric)
        if isinstance(quantizer, BitsAndBytes):
            return self.via == f"bnb_{quantizer.mode}"
        if isinstance(quantizer, GGUFQuant):
            return self.via == f"gguf_{quantizer.qtype}"
        return False

    def check_spec(self, spec: Any) -> None:
        """Cross-group check run by config.validate, before any model is loaded."""
        self.check_quantizer(spec.quantizer)

    def check_quantizer(self, quantizer: Quantizer) -> None:
        """Refuse a round trip through the configured quantizer itself."""
        if self.same_as(quantizer):
            raise ConfigError(
                "defense.via",
                self.via,
                f"a round trip different from quantizer={getattr(quantizer, 'name', '?')} "
                "(the same one changes nothing)",
            )

    @torch.no_grad()
    def apply(
        self, model: PreTrainedModel, quantizer: Quantizer, ctx: RunContext
    ) -> PreTrainedModel:
        self.last_stats = {}
        qname = getattr(quantizer, "name", type(quantizer).__name__)
        self.check_quantizer(quantizer)
        grid = isinstance(quantizer, GridQuantizer)
        targets = list(quantized_weights(model, quantizer))
        counter = ChangeCounter()
        per_tensor: dict[str, dict] = {}
        abs_sum = sq_diff = sq_norm = 0.0
        abs_max, n = 0.0, 0
        for name, p in tqdm(targets, f"launder via {self.via}", disable=not ctx.progress):
            geo = codes = None
            if grid:
                geo = Geometry.of(quantizer, p)
                codes = weight_codes(quantizer, p.detach().cpu())
            new = self.round_trip(p.detach())
            d = (new.double() - p.detach().double()).cpu()
            abs_sum += float(d.abs().sum())
            abs_max = max(abs_max, float(d.abs().max()))
            sq_diff += float((d * d).sum())
            sq_norm += float((p.detach().double() ** 2).sum())
            n += p.numel()
            p.copy_(new)
            row: dict[str, Any] = {"max_abs_change": float(d.abs().max())}
            if geo is not None:  # sigma only feeds the uniform theory, meaningless here
                row.update(counter.add(quantizer, geo, codes, p, 0.0))
                row.pop("theory_uniform", None)
            per_tensor[name] = row
        stats: dict[str, Any] = {
            **self.describe(),
            "quantizer": qname,
            "n_tensors": len(targets),
            "n_params": n,
            "mean_abs_change": abs_sum / n if n else None,
            "max_abs_change": abs_max,
            "rel_change": (sq_diff / sq_norm) ** 0.5 if sq_norm else None,
            "tensors": per_tensor,
        }
        summary = counter.summary()
        summary.pop("theory_uniform", None)
        if summary:
            library = summary.pop("fraction_changed_library", None)
            stats["fraction_changed"] = (
                library if library is not None else summary["fraction_changed_intervals"]
            )
            stats["fraction_changed_method"] = "library" if library is not None else "intervals"
            stats["fraction_changed_excludes"] = "pinned (scale-setting) weights"
            stats.update(summary)
        self.last_stats = stats
        return model
