"""The jobs of a sweep directory: discovery, their results.json and overrides."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

SKIP_DIRS = {"wandb", "report_plots", "generations", "loglik", "quantized"}


class ReportError(Exception):
    """A usage or input problem: printed as `qexp.tools.report: <message>`, exit code 2."""


@dataclass
class Job:
    """One Hydra job directory."""

    path: Path
    name: str  # relative to the report directory
    overrides: dict[str, str] | None  # key -> value as written (None: no overrides.yaml)
    results: dict | None
    swept: dict[str, str] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return short_name(self.name)

    @property
    def status(self) -> str:
        if self.results is None:
            return "missing"
        return str(self.results.get("status", "unknown"))

    @property
    def error(self) -> str:
        if self.results is None:
            return "no results.json (the job stopped before its first write: config error?)"
        return str(self.results.get("error") or "")

    @property
    def config(self) -> dict:
        return (self.results or {}).get("config") or {}

    @property
    def conditions(self) -> dict[str, dict]:
        return (self.results or {}).get("conditions") or {}


def short_name(name: str) -> str:
    """A job name with Hydra's `<num>_<override_dirname>` parts cut to `<num>`."""
    return "/".join(re.sub(r"^(\d+)_.*", r"\1", part) for part in Path(name).parts)


def _sort_key(rel: Path) -> tuple:
    """Hydra's `<num>_<overrides>` subdirs in job-number order, others by name."""
    key = []
    for part in rel.parts:
        m = re.match(r"(\d+)_", part)
        key.append((int(m.group(1)) if m else math.inf, part))
    return tuple(key)


def _read_overrides(path: Path) -> dict[str, str] | None:
    f = path / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    import yaml

    lines = yaml.safe_load(f.read_text(encoding="utf-8")) or []
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key.strip()] = value.strip()
    return out


def discover(root: Path, max_depth: int = 2) -> list[Job]:
    """Job dirs (with results.json or .hydra/overrides.yaml) at depth <= max_depth."""
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / "results.json").is_file() or (d / ".hydra" / "overrides.yaml").is_file():
            found.append(d)
            return
        if depth == max_depth:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            if not sub.name.startswith(".") and sub.name not in SKIP_DIRS:
                walk(sub, depth + 1)

    walk(root, 0)
    jobs = []
    for d in sorted(found, key=lambda p: _sort_key(p.relative_to(root))):
        rf = d / "results.json"
        results = None
        if rf.is_file():
            try:
                results = json.loads(rf.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                results = {"status": "unreadable", "error": f"results.json: {e}"}
        name = str(d.relative_to(root)) if d != root else d.name
        jobs.append(Job(d, name, _read_overrides(d), results))
    return jobs
