"""`benchmark=lm_eval`: any lm-evaluation-harness task, run on the in-memory model.

Tasks by name (the harness's registry; hub datasets need network or an HF cache) or local
task YAMLs via `include_path`. qexp ships `qexp_svamp`: the embedded SVAMP-style set with
exactly qexp's own few-shot prompt, stop strings and last-number parsing, so the harness's
`exact_match` can be checked against qexp's `accuracy` on the same items.
Metrics land under the condition as `lm_eval/<task>/<metric>[/<filter>]`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import yaml

from qexp.benchmarks.base import Benchmark, BenchResult
from qexp.core.context import RunContext
from qexp.core.errors import check
from qexp.core.io import atomic_write_text
from qexp.data import svamp_embedded_path
from qexp.data.svamp import EXEMPLARS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LAST_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?)"


def qexp_svamp_task(few_shot: int = 4, max_gen_toks: int = 128) -> dict[str, Any]:
    """The harness task config for the embedded set, mirroring benchmark=svamp."""
    prefix = "".join(f"Question: {b} {q}\nAnswer: {a}\n\n" for b, q, a in EXEMPLARS[:few_shot])
    # Jinja: escape the literal prefix so braces in it can never be read as template syntax
    literal = prefix.replace("{", "{{ '{' }}").replace("}", "{{ '}' }}")
    return {
        "task": "qexp_svamp",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(svamp_embedded_path())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": literal + "Question: {{Body}} {{Question}}\nAnswer:",
        "doc_to_target": "{{Answer | int}}",
        "target_delimiter": "",
        "generation_kwargs": {
            "until": ["\n\n", "\nQuestion:"],
            "do_sample": False,
            "max_gen_toks": max_gen_toks,
        },
        "filter_list": [
            {
                "name": "last_number",
                "filter": [
                    {"function": "regex", "regex_pattern": LAST_NUMBER, "group_select": -1},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": [",", r"\.0+$"],
            }
        ],
        "metadata": {"version": 1.0},
    }


def write_builtin_tasks(root: Path) -> Path:
    """Write qexp's task YAMLs under `root` (content-addressed) and return the directory."""
    text = yaml.safe_dump(qexp_svamp_task(), sort_keys=False, allow_unicode=True)
    out = root / "lm_eval_tasks" / hashlib.sha256(text.encode()).hexdigest()[:12]
    if not (out / "qexp_svamp.yaml").exists():
        atomic_write_text(out / "qexp_svamp.yaml", text)
    return out


def _key(task: str, metric: str) -> str:
    name, _, filt = metric.partition(",")
    return f"lm_eval/{task}/{name}" + ("" if filt in ("", "none") else f"/{filt}")


@dataclass
class LMEval(Benchmark):
    """Tasks of the lm-evaluation-harness on the condition's model, offline-capable."""

    name: str = "lm_eval"
    tasks: List[str] = field(default_factory=lambda: ["qexp_svamp"])
    include_path: Optional[str] = None
    num_fewshot: Optional[int] = None
    limit: Optional[int] = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        check(
            importlib.util.find_spec("lm_eval") is not None,
            "benchmark",
            "lm_eval",
            "another benchmark, or install the extra: pip install 'qexp[eval]'",
        )
        check(len(self.tasks) > 0, "tasks", self.tasks, "a non-empty list of task names")
        check(
            self.include_path is None or Path(self.include_path).expanduser().is_dir(),
            "include_path",
            self.include_path,
            "null or a directory of task YAMLs",
        )
        check(
            self.limit is None or self.limit >= 1,
            "limit",
            self.limit,
            "null (all items) or an integer >= 1",
        )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")

    def evaluate(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, ctx: RunContext, condition: str
    ) -> BenchResult:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        paths = [str(write_builtin_tasks(ctx.cache_dir))]
        if self.include_path:
            paths.append(str(Path(self.include_path).expanduser()))
        lm = HFLM(
            pretrained=model, tokenizer=tok, batch_size=self.batch_size, device=str(model.device)
        )
        out = simple_evaluate(
            model=lm,
            tasks=list(self.tasks),
            num_fewshot=self.num_fewshot,
            limit=self.limit,
            task_manager=TaskManager(include_path=paths),
            log_samples=True,
            bootstrap_iters=0,
            random_seed=ctx.seed,
            numpy_random_seed=ctx.seed,
            torch_random_seed=ctx.seed,
            fewshot_random_seed=ctx.seed,
        )
        metrics: dict[str, Any] = {}
        for task, vals in out["results"].items():
            for metric, v in vals.items():
                if (
                    isinstance(v, (int, float))
                    and "_stderr" not in metric
                    and metric != "sample_len"
                ):
                    metrics[_key(task, metric)] = float(v)
        records = []
        for task, samples in out.get("samples", {}).items():
            for s in samples:
                resp = s["resps"][0][0] if s.get("resps") else None
                filt = s["filtered_resps"][0] if s.get("filtered_resps") else None
                records.append(
                    {
                        "id": f"{task}/{s['doc_id']}",
                        "task": task,
                        "prompt": s["arguments"][0][0] if s.get("arguments") else None,
                        "output": resp,
                        "parsed": filt,
                        "gold": s.get("target"),
                        "correct": bool(s.get("exact_match", s.get("acc", 0))),
                    }
                )
        return BenchResult(metrics, records)
