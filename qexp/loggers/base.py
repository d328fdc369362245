"""The logger interface: one logging run per job, closed in `finally`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qexp.core.plugin import Plugin


@dataclass
class Logger(Plugin):
    """`logger=none`: local files only (results.json and generations/ are always written)."""

    group: ClassVar[str] = "logger"

    name: str = "none"

    def start(self, config: dict, run_dir: Path, job_name: str, group: str | None = None) -> None:
        """Open the logging run; `group` names the sweep the job belongs to."""

    def log_condition(self, condition: str, metrics: dict[str, Any], records: list[dict]) -> None:
        """Log one condition's metrics (as `<condition>/<metric>`) and generations."""

    def finish(self, status: str, results: dict | None = None, run_dir: Path | None = None) -> None:
        """Close the logging run; `status` is `complete` or `failed`, `results` the dict
        written to results.json and `run_dir` the job's directory (its plots, generations/
        and attacked/ are there), both None when the job stopped before they existed."""
