"""defense=launder: quantize and de-quantize with another quantizer before the configured one.

Every linear weight the configured quantizer quantizes (its layers minus `skip`) is replaced
by its round trip through `via`, in full precision: Q(D(M)) = Q(deq(Q_via(M))). A weight an
attacker parked just inside a preserving interval of Q is moved onto Q_via's grid, which
lands it elsewhere relative to Q's boundaries.

`via` is any grid quantizer option (conf/quantizer/: `rtn8_g64`, `rtn4`, `bnb_int8`,
`bnb_nf4`, `gguf_q8_0`, ...): its own `fake_quant`, the same library operation the quantizer
runs, so a new grid quantizer works here without touching this file. `via_args` changes keys
of that option for the round trip (e.g. `defense.via_args={group_size: 32}`). A round trip
identical to the configured quantizer (a no-op) is refused before any model loads.

Recorded in `defense_stats`: the weight change (mean / max |Δw|, relative Frobenius norm)
and, for a grid quantizer, the fraction of its codes the laundering changed (real library,
as in `defense=noise`; pinned weights excluded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check
from qexp.core.plugin import StageResult, Subject
from qexp.core.registry import build_option
from qexp.defenses.base import Defense
from qexp.defenses.changes import ChangeCounter, Geometry, quantized_weights
from qexp.quantizers.base import GridQuantizer, Quantizer, grid_options


def same_quantizer(a: Quantizer, b: Quantizer) -> bool:
    """Whether two quantizers are the same operation (same class and keys, names aside)."""
    if type(a) is not type(b):
        return False
    fields = lambda q: {k: v for k, v in q.settings().items() if k != "name"}  # noqa: E731
    return fields(a) == fields(b)


@dataclass
class Launder(Defense):
    """De-quantize / re-quantize: the weights make a round trip through `via` first."""

    name: str = "launder"
    via: str = "rtn8_g64"  # a grid quantizer option
    via_args: Optional[Dict[str, Any]] = None  # keys of that option changed for the trip

    # derived (set by `resolve`): the `via` option with `via_args`, built
    round_trip_quantizer: Any = field(default=None, init=False, repr=False)

    def resolve(self, spec: Any) -> None:
        """Build the round trip's quantizer (`via` with `via_args`)."""
        grids = grid_options()
        check(self.via in grids, "defense.via", self.via, "a grid quantizer: " + ", ".join(grids))
        try:
            self.round_trip_quantizer = build_option(
                "quantizer", self.via, "defense.via", self.via_args
            )
        except ConfigError as e:  # its key sits under defense.via_args
            key = e.key.removeprefix("quantizer.")
            raise ConfigError(f"defense.via_args.{key}", e.value, e.allowed) from None

    def describe(self) -> dict:
        """The `via` round trip as recorded in defense_stats: the option and its keys."""
        keys = self.round_trip_quantizer.settings()
        return {"via": self.via, "via_config": {k: v for k, v in keys.items() if k != "name"}}

    def check_spec(self, spec: Any) -> None:
        """Cross-group check run by config.validate, before any model is loaded."""
        self.check_quantizer(spec.quantizer)

    def check_quantizer(self, quantizer: Quantizer) -> None:
        """Refuse a round trip through the configured quantizer itself."""
        if same_quantizer(self.round_trip_quantizer, quantizer):
            raise ConfigError(
                "defense.via",
                self.via,
                f"a round trip different from quantizer={quantizer.name} (the same one "
                "changes nothing): another option, or other defense.via_args",
            )

    @torch.no_grad()
    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        model = subject.model
        self.check_quantizer(quantizer)
        via = self.round_trip_quantizer
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
                codes = quantizer.weight_codes(p.detach().cpu())
            new = via.fake_quant(p.detach().cpu()).to(device=p.device, dtype=p.dtype)
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
            "quantizer": quantizer.name,
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
            stats["fraction_changed"] = summary.pop("fraction_changed_library")
            stats["fraction_changed_method"] = "library"
            stats["fraction_changed_excludes"] = "pinned (scale-setting) weights"
            stats.update(summary)
        return StageResult(model, stats)
