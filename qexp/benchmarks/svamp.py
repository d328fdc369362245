"""SVAMP: arithmetic word problems, greedy batched generation, last-number parsing.

Data: the embedded SVAMP-style set (default), the real SVAMP from the hub (`ChilleD/SVAMP`,
through `datasets`, needs network), or a local JSON/JSONL file with SVAMP's fields
`Body`, `Question`, `Answer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List

from qexp.benchmarks.generative import GenerativeBenchmark
from qexp.data import svamp_embedded_path
from qexp.errors import ConfigError
from qexp.hub import hub_dataset
from qexp.io import load_records
from qexp.metrics import (
    last_number,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
    try:
        answer = float(row["Answer"])
    except (TypeError, ValueError):
        raise ConfigError("benchmark.path", where, "a numeric Answer") from None
    return {
        "id": str(row.get("ID", "")),
        "body": str(row["Body"]).strip(),
        "question": str(row["Question"]).strip(),
        "answer": answer,
    }


def load_svamp_file(path: Path) -> list[dict]:
    """SVAMP items from a JSON list (the original release), {"data": [...]} or JSONL."""
    return [_item(r, where) for where, r in load_records(path, "benchmark.path")]


def load_svamp_hub(hub_id: str, split: str) -> list[dict]:
    """SVAMP items from the hub through `datasets` (needs network or a local HF cache)."""
    rows = hub_dataset("benchmark.hub_id", hub_id, split)
    return [_item(r, f"{hub_id}:{split}[{i}]") for i, r in enumerate(rows)]


@dataclass
class SVAMP(GenerativeBenchmark):
    """Arithmetic word problems; accuracy by last-number match plus degeneration metrics."""

    name: str = "svamp"
    source: str = "embedded"
    hub_id: str = "ChilleD/SVAMP"
    few_shot: int = 4
    stop_strings: List[str] = field(default_factory=lambda: ["\n\n", "\nQuestion:"])

    sources = SOURCES
    max_few_shot = len(EXEMPLARS)

    def __post_init__(self) -> None:
        if self.chat_template:  # turns end with the template's own end-of-turn token
            self.stop_strings = []
        super().__post_init__()

    def items(self) -> list[dict]:
        """The evaluated items, in file order, capped by `limit`."""
        if self.source == "hub":
            rows = load_svamp_hub(self.hub_id, self.split)
        elif self.source == "file":
            rows = load_svamp_file(Path(self.path).expanduser())
        else:
            rows = load_svamp_file(svamp_embedded_path())
        return self.window(rows)

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

    def parse(self, text: str) -> float | None:
        return last_number(text)
