"""Hydra callback: failed jobs of a sweep fail the sweep's exit status.

The one mechanism for every launcher (in-process, joblib, Ray, submitit/Slurm), configured
in conf/config.yaml as `hydra.callbacks.qexp_failed_jobs`: at the end of a sweep it
reads the sweep's results.json files; any written during this sweep whose status is not
"complete" (or "n/a": a matrix cell that does not apply) is reported and the process exits 1.
`MatrixPlan` (experiment=matrix) prints and writes the matrix's plan before the sweep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def _results(sweep_dir: Path) -> Dict[Path, int]:
    """results.json of every job dir directly under sweep_dir, with its mtime (ns)."""
    out: Dict[Path, int] = {}
    for path in sweep_dir.glob("*/results.json"):
        with contextlib.suppress(OSError):  # removed meanwhile
            out[path] = path.stat().st_mtime_ns
    return out


def _errors() -> logging.Logger:
    from qexp.core.console import console  # qexp's console logger (a plain line on stderr)

    return console("qexp")


def _job_order(path: Path) -> tuple:
    num, _, rest = path.parent.name.partition("_")
    return (int(num), rest) if num.isdigit() else (sys.maxsize, path.parent.name)


class FailedJobs(Callback):
    """Exit 1 after a sweep in which a job wrote a results.json that is not complete."""

    def __init__(self) -> None:
        self._before: Dict[Path, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._before = _results(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = []
        for path, mtime in sorted(_results(Path(str(config.hydra.sweep.dir))).items()):
            if self._before.get(path) == mtime:  # not written by this sweep (skipped, other)
                continue
            try:
                status = json.loads(path.read_text(encoding="utf-8")).get("status")
            except (OSError, ValueError):
                status = "unreadable"
            if status not in ("complete", "n/a"):  # n/a: a matrix cell that does not apply
                failed.append(path)
        if failed:
            failed.sort(key=_job_order)
            names = ", ".join(p.parent.name for p in failed)
            _errors().error("qexp: %d job(s) failed: %s", len(failed), names)
            sys.exit(1)


class MatrixPlan(Callback):
    """experiment=matrix: print the plan (cells, shared stages, estimated hours) and write
    it to <sweep dir>/matrix_plan.json before any job launches."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from qexp.core.io import atomic_write_json
        from qexp.pipeline.matrix import describe, plan

        p = plan(config)
        _errors().warning("%s", describe(p))
        sweep = Path(str(config.hydra.sweep.dir))
        sweep.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sweep / "matrix_plan.json", p)
