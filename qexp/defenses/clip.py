"""defense=clip: per-group outlier clipping before quantization.

The defense "Widening the Gap" (Zhan et al., 2026) evaluates against outlier injection: in
every row of every linear weight the configured quantizer quantizes, each block of
`group_size` consecutive input weights has its largest-|w| weight changed, unconditionally
(`ratio: null`, the paper's): set to zero (`action: zero`, the paper's default), divided by
`divide_by` (`action: divide`), or clamped to the block's second largest |w| with its sign
kept (`action: clamp`). With `ratio: R` only blocks whose max |w| is at least R times their
second largest are touched, which leaves a clean model almost unchanged.

Recorded in `defense_stats`: blocks seen and changed, the fraction of weights changed and
the relative Frobenius change of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from qexp.core.blocks import block_top2
from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.defenses.base import Defense
from qexp.quantizers.base import Quantizer, config_widths, group_fit

ACTIONS = ("zero", "divide", "clamp")


@dataclass
class Clip(Defense):
    """Each block's largest-|w| weight zeroed, divided or clamped (optionally only outliers)."""

    name: str = "clip"
    group_size: int = 32
    action: str = "zero"
    divide_by: float = 2.0
    ratio: Optional[float] = None

    surface: ClassVar[Optional[str]] = "outliers"

    def __post_init__(self) -> None:
        check(self.group_size >= 2, "group_size", self.group_size, "an integer >= 2")
        check_choice("action", self.action, ACTIONS)
        check(self.divide_by > 1, "divide_by", self.divide_by, "a number > 1")
        check(
            self.ratio is None or self.ratio > 1, "ratio", self.ratio, "null (every block) or > 1"
        )

    def outlier_rule(self) -> tuple[int, Optional[float]]:
        """(group_size, ratio): which blocks' largest |w| this defense changes."""
        return self.group_size, self.ratio

    def check_model(self, config: Any) -> None:
        """The group must divide every decoder linear's input width (from config.json)."""
        widths = config_widths(config)
        bad, ok = group_fit(widths or [], self.group_size)
        check(
            not bad,
            "defense.group_size",
            self.group_size,
            f"a divisor of every input width {widths}: one of {ok}",
        )

    @torch.no_grad()
    def clipped(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`w` as this defense leaves it, and which blocks it changed ([out, in/group])."""
        cols, first, second = block_top2(w, self.group_size)
        hit = torch.ones_like(first, dtype=torch.bool)
        if self.ratio is not None:
            hit = first >= self.ratio * second
        old = w.gather(1, cols)
        if self.action == "zero":
            new = torch.zeros_like(old)
        elif self.action == "divide":
            new = old / self.divide_by
        else:
            new = old.sign() * second.to(w.dtype)
        return w.scatter(1, cols, torch.where(hit, new, old)), hit

    @torch.no_grad()
    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        blocks = changed = numel = 0
        before = after = 0.0
        for name, lin in quantizer.quantized_linears(subject.model):
            w = lin.weight
            width = w.shape[1]
            check(
                width % self.group_size == 0,
                "defense.group_size",
                self.group_size,
                f"a divisor of every input width ({name}: {width})",
            )
            new, hit = self.clipped(w)
            before += float(w.double().pow(2).sum())
            after += float((new - w).double().pow(2).sum())
            w.copy_(new)
            blocks += hit.numel()
            changed += int(hit.sum())
            numel += w.numel()
        info = {
            "blocks": blocks,
            "blocks_changed": changed,
            "weights_changed_fraction": changed / numel if numel else 0.0,
            "rel_frobenius_change": (after / before) ** 0.5 if before else 0.0,
        }
        return StageResult(subject.model, info)
