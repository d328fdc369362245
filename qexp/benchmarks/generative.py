"""Generative benchmarks: prompts → batched generation → parsed answers + degeneration metrics.

A subclass supplies `items()`, `prompt(item, tok)` and `parse(text)`; items carry `id` and
`answer`. Metrics: accuracy, self_ppl, max_repeat_3, seq_rep_4 (on generated token ids),
tokens_per_s, mean_new_tokens, n_items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, List, Optional

from qexp.benchmarks.base import Benchmark, BenchResult
from qexp.benchmarks.generation import GenerationSettings, generate
from qexp.benchmarks.metrics import max_repeat_n, mean_defined, perplexity, seq_rep_n
from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class GenerativeBenchmark(Benchmark):
    """Shared data-source and decoding keys of every generative benchmark."""

    rates: ClassVar[dict[str, str]] = {"accuracy": "correct"}

    name: str = "generative"
    source: str = "file"
    path: Optional[str] = None
    hub_id: str = ""
    split: str = "test"
    limit: Optional[int] = None
    offset: int = 0
    few_shot: int = 0
    chat_template: bool = False
    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    prefix_cache: bool = True
    stop_strings: List[str] = field(default_factory=list)

    sources = ("hub", "file")
    max_few_shot = 0

    def __post_init__(self) -> None:
        check_choice("source", self.source, self.sources)
        if self.path is not None:
            self.source = "file"
            p = Path(self.path).expanduser()
            check(p.is_file(), "path", self.path, "an existing .json or .jsonl file")
            check(p.suffix in (".json", ".jsonl"), "path", self.path, "a .json or .jsonl file")
        check(
            self.source != "file" or self.path is not None,
            "path",
            self.path,
            "a file path when benchmark.source=file",
        )
        check(
            self.limit is None or self.limit >= 1,
            "limit",
            self.limit,
            "null (all items) or an integer >= 1",
        )
        check(self.offset >= 0, "offset", self.offset, "an integer >= 0 (items skipped first)")
        check(
            0 <= self.few_shot <= self.max_few_shot,
            "few_shot",
            self.few_shot,
            f"an integer in 0..{self.max_few_shot}",
        )
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")

    def check_spec(self, spec: Any) -> None:
        """Local data (shipped or a file) loads, at validation: a bad file fails here."""
        if self.source != "hub":
            self._check_items()

    def check_model(self, config: Any) -> None:
        """Hub data is in the local cache or reachable, before any weights load."""
        if self.source == "hub":
            self._check_items()

    def _check_items(self) -> None:
        """The items load and at least one is left after `offset`/`limit`."""
        check(
            len(self.items()) > 0,
            "benchmark.offset",
            self.offset,
            "an offset below the number of items in the data",
        )

    def items(self) -> list[dict]:
        """Evaluated items ({id, answer, ...}), in order, capped by `limit`."""
        raise NotImplementedError

    def window(self, rows: list) -> list:
        """rows[offset : offset + limit]: disjoint validation/test splits of one source."""
        end = None if self.limit is None else self.offset + self.limit
        return rows[self.offset : end]

    def prompt(self, item: dict, tok: PreTrainedTokenizerBase) -> str:
        """The model input for one item."""
        raise NotImplementedError

    def parse(self, text: str) -> float | None:
        """The answer in a model output, or None."""
        raise NotImplementedError

    def judge(self, item: dict, text: str) -> dict:
        """Per-record scoring fields of one output (default: parsed answer vs gold)."""
        pred = self.parse(text)
        return {
            "parsed": pred,
            "gold": item["answer"],
            "correct": pred is not None and abs(pred - item["answer"]) < 1e-6,
        }

    def summarize(self, records: list[dict]) -> dict:
        """Task metrics over all records (default: accuracy)."""
        return {"accuracy": sum(r["correct"] for r in records) / len(records)}

    def evaluate(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, ctx: RunContext, condition: str
    ) -> BenchResult:
        items = self.items()
        prompts = [self.prompt(it, tok) for it in items]
        settings = GenerationSettings(
            self.max_new_tokens,
            self.batch_size,
            self.do_sample,
            self.temperature,
            self.top_p,
            ctx.seed,
            self.prefix_cache,
        )
        gens, tok_s = generate(
            model,
            tok,
            prompts,
            settings,
            self.stop_strings,
            ctx.progress,
            desc=f"{condition}: {self.name}",
        )
        records, nll, n_tok = [], 0.0, 0
        for it, g in zip(items, gens):
            nll, n_tok = nll + g.nll, n_tok + len(g.token_ids)
            records.append(
                {
                    "id": it["id"],
                    "prompt": g.prompt,
                    "output": g.text,
                    **self.judge(it, g.text),
                    "n_new_tokens": len(g.token_ids),
                    "nll": round(float(g.nll), 6),  # summed over the generated tokens
                    "max_repeat_3": max_repeat_n(g.token_ids, 3),
                    "seq_rep_4": seq_rep_n(g.token_ids, 4),
                }
            )
        metrics = {
            **self.summarize(records),
            "self_ppl": perplexity(nll, n_tok),
            "max_repeat_3": mean_defined(max_repeat_n(g.token_ids, 3) for g in gens),
            "seq_rep_4": mean_defined(seq_rep_n(g.token_ids, 4) for g in gens),
            "tokens_per_s": tok_s,
            "mean_new_tokens": n_tok / len(records),
            "n_items": len(records),
        }
        return BenchResult({k: v for k, v in metrics.items() if v is not None}, records)
