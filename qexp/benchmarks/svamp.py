"""SVAMP: arithmetic word problems, greedy batched generation, last-number parsing.

Data: the embedded SVAMP-style set (default), the real SVAMP from the hub (`ChilleD/SVAMP`,
through `datasets`, needs network), or a local JSON/JSONL file with SVAMP's fields
`Body`, `Question`, `Answer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qexp.benchmarks.base import Benchmark, BenchResult
from qexp.benchmarks.generation import GenerationSettings, generate
from qexp.context import RunContext
from qexp.data import svamp_embedded_path
from qexp.errors import ConfigError, check, check_choice
from qexp.io import read_jsonl
from qexp.metrics import (
    last_number,
    max_repeat_n,
    mean_defined,
    perplexity,
    seq_rep_n,
)

FIELDS = ("Body", "Question", "Answer")
SOURCES = ("embedded", "hub", "file")

# Worked examples for the few-shot prompt; written for qexp, not taken from any eval set.
EXEMPLARS = [
    (
        "Jake has 5 red balls and 7 blue balls.",
        "How many balls does Jake have?",
        "Jake has 5 + 7 = 12 balls. The answer is 12.",
    ),
    (
        "A baker made 30 muffins and sold 18 of them.",
        "How many muffins are left?",
        "30 - 18 = 12 muffins are left. The answer is 12.",
    ),
    (
        "There are 4 tables and each table has 6 chairs.",
        "How many chairs are there?",
        "4 * 6 = 24 chairs. The answer is 24.",
    ),
    (
        "Anna has 20 grapes and splits them equally among 5 friends.",
        "How many grapes does each friend get?",
        "20 / 5 = 4 grapes each. The answer is 4.",
    ),
    (
        "Paul had 9 stamps. He bought 3 packs with 4 stamps in each pack.",
        "How many stamps does Paul have now?",
        "3 * 4 = 12 new stamps, and 9 + 12 = 21. The answer is 21.",
    ),
    (
        "A farm has 50 hens. 14 hens were sold and 6 new hens were bought.",
        "How many hens does the farm have now?",
        "50 - 14 = 36, and 36 + 6 = 42. The answer is 42.",
    ),
    (
        "Lucy read 8 pages on Monday and twice as many on Tuesday.",
        "How many pages did Lucy read on Tuesday?",
        "2 * 8 = 16 pages. The answer is 16.",
    ),
    (
        "A class of 28 students forms teams of 4.",
        "How many teams are there?",
        "28 / 4 = 7 teams. The answer is 7.",
    ),
]


def _item(row: dict, where: str) -> dict:
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ConfigError(
            "benchmark.path",
            where,
            f"SVAMP rows with fields {', '.join(FIELDS)} (missing {', '.join(missing)})",
        )
    return {
        "id": str(row.get("ID", "")),
        "body": str(row["Body"]).strip(),
        "question": str(row["Question"]).strip(),
        "answer": float(row["Answer"]),
    }


def load_svamp_file(path: Path) -> list[dict]:
    """SVAMP items from a JSON list (the original release) or JSONL file."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix == ".json" else read_jsonl(path)
    except json.JSONDecodeError as e:
        raise ConfigError("benchmark.path", str(path), f"valid JSON/JSONL ({e})") from None
    if isinstance(rows, dict) and "data" in rows:
        rows = rows["data"]
    check(isinstance(rows, list), "benchmark.path", str(path), "a JSON list of SVAMP rows")
    return [_item(r, f"{path}[{i}]") for i, r in enumerate(rows)]


def load_svamp_hub(hub_id: str, split: str) -> list[dict]:
    """SVAMP items from the hub through `datasets` (needs network or a local HF cache)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "benchmark.source",
            "hub",
            "embedded or file, or install qexp[hub] (datasets) for hub data",
        ) from None
    ds = datasets.load_dataset(hub_id, split=split)
    return [_item(r, f"{hub_id}:{split}[{i}]") for i, r in enumerate(ds)]


@dataclass
class SVAMP(Benchmark):
    """Arithmetic word problems; accuracy by last-number match plus degeneration metrics."""

    name: str = "svamp"
    source: str = "embedded"
    path: Optional[str] = None
    hub_id: str = "ChilleD/SVAMP"
    split: str = "test"
    limit: Optional[int] = None
    few_shot: int = 4
    chat_template: bool = False
    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    prefix_cache: bool = True
    stop_strings: List[str] = field(default_factory=lambda: ["\n\n", "\nQuestion:"])

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        if self.path is not None:
            check(
                self.source in ("file", "embedded"),
                "source",
                self.source,
                "file (or leave the default) when benchmark.path is set",
            )
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
        check(
            0 <= self.few_shot <= len(EXEMPLARS),
            "few_shot",
            self.few_shot,
            f"an integer in 0..{len(EXEMPLARS)}",
        )
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")

    def items(self) -> list[dict]:
        """The evaluated items, in file order, capped by `limit`."""
        if self.source == "hub":
            rows = load_svamp_hub(self.hub_id, self.split)
        elif self.source == "file":
            rows = load_svamp_file(Path(self.path).expanduser())
        else:
            rows = load_svamp_file(svamp_embedded_path())
        return rows[: self.limit] if self.limit else rows

    def prompt(self, item: dict, tok: PreTrainedTokenizerBase) -> str:
        """Few-shot plain-text prompt, or the same turns through the chat template."""
        shots = EXEMPLARS[: self.few_shot]
        if not self.chat_template:
            parts = [f"Question: {b} {q}\nAnswer: {a}\n\n" for b, q, a in shots]
            return "".join(parts) + f"Question: {item['body']} {item['question']}\nAnswer:"
        if not getattr(tok, "chat_template", None):
            raise ConfigError(
                "benchmark.chat_template", True, "false for a tokenizer without a chat template"
            )
        msgs = []
        for b, q, a in shots:
            msgs += [{"role": "user", "content": f"{b} {q}"}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": f"{item['body']} {item['question']}"})
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

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
        stops = [] if self.chat_template else self.stop_strings
        gens, tok_s = generate(
            model, tok, prompts, settings, stops, ctx.progress, desc=f"{condition}: svamp"
        )
        records, nll, n_tok = [], 0.0, 0
        for it, g in zip(items, gens):
            pred = last_number(g.text)
            nll, n_tok = nll + g.nll, n_tok + len(g.token_ids)
            records.append(
                {
                    "id": it["id"],
                    "prompt": g.prompt,
                    "output": g.text,
                    "parsed": pred,
                    "gold": it["answer"],
                    "correct": pred is not None and abs(pred - it["answer"]) < 1e-6,
                    "n_new_tokens": len(g.token_ids),
                }
            )
        metrics = {
            "accuracy": sum(r["correct"] for r in records) / len(records),
            "self_ppl": perplexity(nll, n_tok),
            "max_repeat_3": mean_defined(max_repeat_n(g.token_ids, 3) for g in gens),
            "seq_rep_4": mean_defined(seq_rep_n(g.token_ids, 4) for g in gens),
            "tokens_per_s": tok_s,
            "mean_new_tokens": n_tok / len(records),
            "n_items": len(records),
        }
        return BenchResult({k: v for k, v in metrics.items() if v is not None}, records)
