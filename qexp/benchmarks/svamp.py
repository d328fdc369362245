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
from qexp.benchmarks.metrics import (
    last_number,
)
from qexp.core.errors import ConfigError
from qexp.core.hub import hub_dataset
from qexp.core.io import load_records
from qexp.data import svamp_embedded_path
from qexp.data.svamp import EXEMPLARS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIELDS = ("Body", "Question", "Answer")
SOURCES = ("embedded", "hub", "file")


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
