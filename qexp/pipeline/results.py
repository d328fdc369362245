"""results.json and generations/*.jsonl, written atomically after every condition."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import transformers

import qexp
from qexp import CONDITIONS
from qexp.core.io import atomic_write_json, atomic_write_jsonl
from qexp.core.memory import PeakRSS, trim_heap
from qexp.pipeline.uncertainty import format_value

TABLE_METRICS = (
    "accuracy",
    "injection_rate",
    "refusal_rate",
    "cos_sim",
    "bertscore_f1",
    "retrieval_at_1",
    "self_ppl",
    "ref_ppl",
    "ppl",
    "max_repeat_3",
    "seq_rep_4",
    "tokens_per_s",
    "n_items",
)
# the sections `Results.read` restores (besides config, memory and error)
READ_BACK = (
    "provenance",
    "function_preservation",
    "conditions",
    "intervals",
    "comparisons",
    "defense_stats",
    "prune",
    "quantization",
    "stage_seconds",
    "cache",
    "status",
    "heartbeat_utc",
)


def provenance(model: str, device: str, dtype: str) -> dict[str, Any]:
    """Versions and origins that determine a run's numbers."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "qexp": qexp.__version__,
        "git_commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": model,
        "device": device,
        "dtype": dtype,
        "started_utc": utc_now(),
        # who writes this run: a reader can tell a killed job (status running, no process)
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def complete_config(run_dir: Path) -> Optional[dict]:
    """The config of a complete results.json in `run_dir`, or None."""
    try:
        body = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return body.get("config") if body.get("status") == "complete" else None


@dataclass
class Results:
    """The results contract of one job (docs/design.md §1); `save()` rewrites results.json."""

    run_dir: Path
    config: dict
    provenance: dict = field(default_factory=dict)
    function_preservation: dict = field(default_factory=dict)
    conditions: dict[str, dict] = field(default_factory=dict)
    # per condition and metric: the 95% interval {lo, hi, method, n} (pipeline/uncertainty.py)
    intervals: dict[str, dict] = field(default_factory=dict)
    # per pair ("attacked_q vs original_q") and metric: the paired difference and its test
    comparisons: dict[str, dict] = field(default_factory=dict)
    defense_stats: dict[str, dict] = field(default_factory=dict)
    prune: dict[str, dict] = field(default_factory=dict)
    quantization: dict[str, dict] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # the memory plan (qexp/core/memory.py), the loaded model's bytes and each stage's peak RSS
    memory: dict[str, Any] = field(default_factory=dict)
    # per stage and condition: computed (cache off), stored (computed, now cached) or hit
    cache: dict[str, str] = field(default_factory=dict)
    status: str = "running"
    error: str | None = None
    heartbeat_utc: str | None = None  # refreshed every HEARTBEAT_S while the job runs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _rss: PeakRSS = field(default_factory=PeakRSS, repr=False)
    _depth: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.memory.update({"baseline_rss_mb": round(self._rss.now_mb(), 1), "peak_rss_mb": {}})
        self.memory["peak_method"] = (
            "VmHWM reset per stage" if self._rss.exact else "ru_maxrss (peak since start)"
        )

    @classmethod
    def read(cls, run_dir: Path) -> Results:
        """A run's results.json read back (the sections as written; nothing is rewritten)."""
        body = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
        sections = {k: body[k] for k in READ_BACK if k in body}
        res = cls(Path(run_dir), body.get("config") or {}, **sections)
        res.memory = body.get("memory") or {}
        res.error = body.get("error")
        return res

    def record_step(self, branch: str, step: str, info: dict) -> None:
        """A model step's info (computed or from the cache) into its section: the attack's
        function preservation, `defense_stats.<branch>`, `prune.<branch>`,
        `quantization.<branch>`."""
        if step == "attack":
            self.function_preservation = info["function_preservation"]
        elif step == "defend":
            self.defense_stats[branch] = info
        elif step == "prune":
            self.prune[branch] = info
        elif step == "quantize":
            self.quantization[branch] = info
        else:  # pragma: no cover - the pipeline's steps are the four above
            raise ValueError(f"no results.json section for step {step!r}")
        self.save()

    def mark_cache(self, name: str, how: str) -> None:
        """How a stage or condition was obtained: computed, stored or hit (results.json
        `cache`)."""
        self.cache[name] = how

    def add(
        self,
        condition: str,
        metrics: dict,
        records: list[dict],
        model_source: str = "",
        intervals: dict | None = None,
    ) -> None:
        """Record one condition: metrics and their intervals into results.json, records into
        generations/, and where the evaluated weights came from (provenance `model_source`)."""
        if model_source:
            self.provenance["model_source"] = model_source
        self.conditions[condition] = metrics
        if intervals:
            self.intervals[condition] = intervals
        if records:
            atomic_write_jsonl(self.run_dir / "generations" / f"{condition}.jsonl", records)
        self.save()

    def compare(self, pair: str, comparison: dict) -> None:
        """The paired comparison of two conditions (`<condition> vs <baseline>`)."""
        if comparison:
            self.comparisons[pair] = comparison
            self.save()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to stage_seconds[name] and record its peak RSS in
        memory["peak_rss_mb"][name] (the larger, when a stage name repeats)."""
        t0 = time.perf_counter()
        if self._depth == 0:
            self._rss.reset()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            dt = time.perf_counter() - t0
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + dt, 3)
            peaks = self.memory["peak_rss_mb"]
            peaks[name] = round(max(peaks.get(name, 0.0), self._rss.peak_mb()), 1)
            if self._depth == 0:
                trim_heap()  # a stage's freed scratch back to the kernel before the next

    def record_plan(self, plan: dict) -> None:
        """The memory plan made before any weights load (qexp/core/memory.py)."""
        self.memory["plan"] = plan
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        """The job's end: `complete` or `failed` (with the error), written at once."""
        self.status = status
        if error is not None:
            self.error = error
        self.save()

    def record_model(self, model: torch.nn.Module) -> None:
        """The bytes of a loaded model's parameters and buffers (tied tensors once)."""
        seen, total = set(), 0
        for t in [*model.parameters(), *model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        self.memory["model_bytes"] = total

    @contextmanager
    def heartbeat(self, every_s: float = 30.0) -> Iterator[None]:
        """Rewrite results.json every `every_s` seconds while the block runs (a job killed
        with SIGKILL leaves status running with a stale heartbeat and a gone pid)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    self.save()
                except RuntimeError:  # a dict grew while being written: the next beat
                    continue

        thread = threading.Thread(target=beat, name="qexp-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def save(self) -> None:
        """Atomically (re)write results.json (thread-safe: the heartbeat saves too)."""
        with self._lock:
            self.heartbeat_utc = utc_now()
            self._write()

    def _write(self) -> None:
        atomic_write_json(self.run_dir / "results.json", self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        """The body of results.json."""
        body = {
            "config": self.config,
            "provenance": self.provenance,
            "function_preservation": self.function_preservation,
            "conditions": self.conditions,
            "intervals": self.intervals,
            "comparisons": self.comparisons,
            "defense_stats": self.defense_stats,
            "prune": self.prune,
            "quantization": self.quantization,
            "stage_seconds": self.stage_seconds,
            "memory": self.memory,
            "cache": self.cache,
            "status": self.status,
            "heartbeat_utc": self.heartbeat_utc,
        }
        if self.error:
            body["error"] = self.error
        return body


def format_table(
    conditions: dict[str, dict],
    intervals: dict[str, dict] | None = None,
    metrics: tuple[str, ...] = TABLE_METRICS,
) -> str:
    """Condition × metric table as aligned plain text (`-` where a metric is absent), each
    number with its 95% interval where it has one: `0.333 [0.22, 0.47]`."""
    extra = sorted({k for c in conditions.values() for k in c if k.startswith("lm_eval/")})
    cols = [m for m in (*metrics, *extra) if any(m in c for c in conditions.values())]
    intervals = intervals or {}

    order = [c for c in CONDITIONS if c in conditions]
    rows = [["condition", *cols]] + [
        [
            name,
            *(format_value(conditions[name].get(c), intervals.get(name, {}).get(c)) for c in cols),
        ]
        for name in order
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
