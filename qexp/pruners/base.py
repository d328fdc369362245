"""The pruner interface: P(M), and the check that a mask has the sparsity it claims."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from qexp.core.context import RunContext
from qexp.core.errors import check
from qexp.core.plugin import Plugin, StageResult, Subject
from qexp.quantizers.base import target_linears

UNSTRUCTURED = "unstructured"


def parse_structure(key: str, value: str) -> Optional[tuple[int, int]]:
    """`unstructured` -> None; `N:M` (N < M) -> (N, M): N of every M consecutive input
    weights of a row are zero."""
    if value == UNSTRUCTURED:
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(value))
    ok = m is not None and 0 < int(m.group(1)) < int(m.group(2))
    check(ok, key, value, "unstructured or N:M with 0 < N < M (e.g. 2:4)")
    return int(m.group(1)), int(m.group(2))


class Pruner(Plugin, ABC):
    """Zeroes weights of the model's linear layers; the result is evaluated like any
    condition. `info` goes to results.json `prune.<branch>`."""

    group: ClassVar[str] = "prune"
    skip: Sequence[str]

    def pruned_linears(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """(name, module) of every linear layer this pruner prunes."""
        return list(target_linears(model, self.skip))

    @abstractmethod
    def prune(self, subject: Subject, ctx: RunContext) -> StageResult:
        """Return the pruned model (may modify `subject.model` in place)."""


@dataclass
class NoPruner(Pruner):
    """`prune=none`: P is the identity."""

    name: str = "none"
    identity: ClassVar[bool] = True
    skip: ClassVar[tuple[str, ...]] = ("lm_head",)

    def prune(self, subject: Subject, ctx: RunContext) -> StageResult:
        return StageResult(subject.model)


@torch.no_grad()
def measured_sparsity(
    linears: list[tuple[str, nn.Linear]], structure: Optional[tuple[int, int]]
) -> dict:
    """The zero fraction of each linear, overall, and for N:M whether every group of M
    consecutive input weights holds at least N zeros."""
    zeros = total = 0
    per: dict[str, float] = {}
    nm_ok = True
    for name, lin in linears:
        z = lin.weight == 0
        per[name] = float(z.float().mean())
        zeros, total = zeros + int(z.sum()), total + z.numel()
        if structure is not None:
            n, m = structure
            if lin.in_features % m:
                nm_ok = False
            else:
                nm_ok &= bool((z.reshape(lin.out_features, -1, m).sum(-1) >= n).all())
    out = {
        "sparsity": zeros / total,
        "min_layer": min(per.values()),
        "max_layer": max(per.values()),
    }
    if structure is not None:
        out["n_m_pattern_holds"] = nm_ok
    return out
