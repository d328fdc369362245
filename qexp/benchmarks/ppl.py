"""`benchmark=ppl`: perplexity of a text, no generation.

Sources: `embedded` (qexp's reference passage), `file` (a local UTF-8 text file) or `hub`
(wikitext-2-raw-v1 test by default, through `datasets`; needs network or an HF cache).
Long texts are scored with sliding windows (`window`, `stride`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from qexp.benchmarks.base import Benchmark, BenchResult
from qexp.benchmarks.metrics import token_nll
from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.hub import hub_dataset
from qexp.data import reference_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Perplexity(Benchmark):
    """Perplexity of one text: `ppl` and `n_tokens`."""

    name: str = "ppl"
    source: str = "embedded"
    path: Optional[str] = None
    hub_id: str = "wikitext"
    hub_config: Optional[str] = "wikitext-2-raw-v1"
    split: str = "test"
    max_chars: Optional[int] = None
    window: int = 1024
    stride: int = 512

    def __post_init__(self) -> None:
        check_choice("source", self.source, ("embedded", "file", "hub"))
        if self.source == "file" or self.path is not None:
            check(
                self.path is not None and Path(self.path).expanduser().is_file(),
                "path",
                self.path,
                "an existing UTF-8 text file (with source=file)",
            )
            self.source = "file"
        check(
            self.max_chars is None or self.max_chars >= 1,
            "max_chars",
            self.max_chars,
            "null or an integer >= 1",
        )
        check(self.window >= 2, "window", self.window, "an integer >= 2")
        check(
            1 <= self.stride < self.window,
            "stride",
            self.stride,
            f"an integer in 1..{self.window - 1} (below window)",
        )

    def text(self) -> str:
        """The scored text."""
        if self.source == "file":
            text = Path(self.path).expanduser().read_text(encoding="utf-8")
        elif self.source == "hub":
            ds = hub_dataset("benchmark.hub_id", self.hub_id, self.split, self.hub_config)
            text = "\n\n".join(t for t in ds["text"] if t.strip())
        else:
            text = reference_text()
        return text[: self.max_chars] if self.max_chars else text

    def evaluate(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, ctx: RunContext, condition: str
    ) -> BenchResult:
        nll = token_nll(model, tok, self.text(), self.window, self.stride)
        return BenchResult(
            {"ppl": float(torch.exp(nll.mean())), "n_tokens": nll.numel()},
            token_nll=[round(float(x), 5) for x in nll],
        )
