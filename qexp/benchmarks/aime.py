"""AIME 2024: 30 competition problems with integer answers 0–999, `\\boxed{}` parsing.

Data: the hub dataset `Maxwell-Jia/AIME_2024` (fields ID, Problem, Solution, Answer; through
`datasets`, needs network or an HF cache) or a local JSON/JSONL file with `Problem` and
`Answer`. Nothing is embedded: the problems are not redistributed with qexp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qexp.benchmarks.generative import GenerativeBenchmark
from qexp.core.errors import ConfigError
from qexp.core.hub import hub_dataset
from qexp.core.io import load_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def parse_aime(text: str) -> float | None:
    """The boxed answer as an integer in 0..999 (AIME's range), else None."""
    boxed = last_boxed(text)
    if boxed is None:
        return None
    boxed = boxed.replace(",", "").replace("$", "").strip()
    if not boxed.isdigit():
        return None
    value = int(boxed)
    return float(value) if 0 <= value <= 999 else None


def _item(row: dict, where: str) -> dict:
    get = lambda k: row.get(k, row.get(k.lower()))  # noqa: E731
    if get("Problem") is None or get("Answer") is None:
        raise ConfigError("benchmark.path", where, "AIME rows with fields Problem and Answer")
    try:
        answer = float(int(str(get("Answer")).strip()))
    except ValueError:
        raise ConfigError("benchmark.path", where, "an integer Answer") from None
    return {"id": str(get("ID") or where), "problem": str(get("Problem")).strip(), "answer": answer}


@dataclass
class AIME24(GenerativeBenchmark):
    """Competition math; greedy reasoning, accuracy on the last boxed integer."""

    name: str = "aime24"
    source: str = "hub"
    hub_id: str = "Maxwell-Jia/AIME_2024"
    split: str = "train"
    chat_template: bool = True
    max_new_tokens: int = 16384
    batch_size: int = 4
    prefix_cache: bool = False
    instruction: str = INSTRUCTION

    def items(self) -> list[dict]:
        if self.source == "file":
            rows = load_records(Path(self.path).expanduser(), "benchmark.path")
            items = [_item(r, where) for where, r in rows]
        else:
            ds = hub_dataset("benchmark.hub_id", self.hub_id, self.split)
            items = [_item(r, f"{self.hub_id}[{i}]") for i, r in enumerate(ds)]
        return self.window(items)

    def prompt(self, item: dict, tok: PreTrainedTokenizerBase) -> str:
        text = f"{item['problem']}\n{self.instruction}"
        if not self.chat_template:
            return f"Problem: {text}\nSolution:"
        if not getattr(tok, "chat_template", None):
            raise ConfigError(
                "benchmark.chat_template", True, "false for a tokenizer without a chat template"
            )
        return tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def parse(self, text: str) -> float | None:
        return parse_aime(text)
