"""The benchmark interface: evaluate one model, return metrics and per-item records."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from qexp.core.context import RunContext
from qexp.core.plugin import Plugin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class BenchResult:
    """Metrics (snake_case; a metric that cannot be computed is absent) and records."""

    metrics: dict[str, Any] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    # a perplexity benchmark's per-token NLL of its text: `ppl` gets the block-bootstrap
    # interval ref_ppl gets (qexp/pipeline/uncertainty.py)
    token_nll: list[float] = field(default_factory=list)


class Benchmark(Plugin, ABC):
    """Evaluates a model of one condition."""

    group: ClassVar[str] = "benchmark"
    # each rate metric and the boolean field of every record it counts: the pipeline gives
    # the rate its Wilson interval and compares conditions with an exact McNemar test
    rates: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def evaluate(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, ctx: RunContext, condition: str
    ) -> BenchResult:
        """Run the benchmark on `model`; `condition` labels progress bars."""


@dataclass
class NoBenchmark(Benchmark):
    """`benchmark=none`: only the model-level metrics (e.g. ref_ppl) are computed."""

    name: str = "none"

    def evaluate(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, ctx: RunContext, condition: str
    ) -> BenchResult:
        return BenchResult()
