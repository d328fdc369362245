"""Weights & Biases logging, offline by default (`logger.mode=online` to sync).

One W&B run per job: per condition its metrics (`<condition>/<metric>`) and a generations
table while the job runs; at the end the summary of results.json (metrics with their 95%
intervals, comparisons, stage seconds, memory, function preservation, status), the job's
PNG plots as images and an artifact with results.json and generations/ (attacked/ too with
`logger.log_attacked=true`). Tags name the config's options (`model:<name>`, ...), the group
names the sweep. wandb is imported only when a run starts (`logger=none` never needs it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from qexp.core.errors import ConfigError, check, check_choice
from qexp.loggers.base import Logger

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["id", "prompt", "output", "parsed", "gold", "correct", "injected", "refused"]
# the config groups whose option names become tags (`<group>:<name>`)
TAG_GROUPS = ("model", "attack", "defense", "prune", "quantizer", "benchmark")
MAX_TAG_LEN = 64  # W&B refuses longer tags
MAX_IMAGES = 200  # PNGs logged at most per job (a job writes a handful)
# run-dir folders whose PNGs are not the job's plots
SKIP_IMAGE_DIRS = {"wandb", "attacked", "quantized"}


def is_number(v: Any) -> bool:
    """An int, float or bool (what a W&B summary plots), not None or a string."""
    return isinstance(v, (int, float))


def flat_numbers(prefix: str, node: Any) -> dict[str, float | int | bool]:
    """The numbers of a nested dict as `prefix/<key>/<key>...` (lists and strings left out)."""
    if is_number(node):
        return {prefix: node}
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flat_numbers(f"{prefix}/{k}" if prefix else str(k), v))
    return out


def pair_key(pair: str) -> str:
    """A comparison as a key part: `attacked vs original` -> `attacked_vs_original`."""
    return re.sub(r"\s+", "_", pair.strip())


def summary_of(results: dict | None) -> dict[str, Any]:
    """The W&B summary of a results.json dict (every section optional):

    - `<condition>/<metric>`: the metric; `<condition>/<metric>_lo`, `_hi`: its 95% interval
    - `compare/<pair>/<metric>/{diff,lo,hi,p,n}` (pair as `attacked_vs_original`, ...)
    - `stage_seconds/<stage>`, `memory/...`, `function_preservation/...` (numbers, flattened)
    - `status` (and `error` when the job failed)
    """
    results = results or {}
    out: dict[str, Any] = {}
    for cond, metrics in (results.get("conditions") or {}).items():
        out.update(flat_numbers(str(cond), metrics or {}))
    for cond, metrics in (results.get("intervals") or {}).items():
        for metric, iv in (metrics or {}).items():
            for end in ("lo", "hi"):
                v = iv.get(end) if isinstance(iv, dict) else None
                if is_number(v):
                    out[f"{cond}/{metric}_{end}"] = v
    for pair, metrics in (results.get("comparisons") or {}).items():
        out.update(flat_numbers(f"compare/{pair_key(str(pair))}", metrics or {}))
    for section in ("stage_seconds", "memory", "function_preservation"):
        out.update(flat_numbers(section, results.get(section) or {}))
    for key in ("status", "error"):
        if isinstance(results.get(key), str):
            out[key] = results[key]
    return out


def tags_of(config: dict, user_tags: list[str]) -> list[str]:
    """`<group>:<name>` of each option in TAG_GROUPS, then the user's tags (no duplicates,
    each cut to W&B's 64 characters)."""
    tags = []
    for group in TAG_GROUPS:
        node = config.get(group)
        if isinstance(node, dict) and node.get("name") is not None:
            tags.append(f"{group}:{node['name']}")
    tags += [str(t) for t in user_tags]
    return list(dict.fromkeys(t[:MAX_TAG_LEN] for t in tags))


def images_in(run_dir: Path) -> dict[str, Path]:
    """The job's PNGs as `plots/<path without .png>` (e.g. `plots/loglik`), wandb's own
    files and model folders left out."""
    found: dict[str, Path] = {}
    for p in sorted(run_dir.rglob("*.png")):
        rel = p.relative_to(run_dir)
        if rel.parts[0] in SKIP_IMAGE_DIRS:
            continue
        if len(found) == MAX_IMAGES:
            log.warning("W&B: more than %d PNGs under %s; the rest not logged", MAX_IMAGES, run_dir)
            break
        found["plots/" + rel.with_suffix("").as_posix()] = p
    return found


@dataclass
class WandbLogger(Logger):
    """One W&B run per job: metrics, generation tables, the results summary, plots and an
    artifact of the job's files; tags from the config's options, the group from the sweep."""

    name: str = "wandb"
    project: str = "qexp"
    entity: Optional[str] = None
    mode: str = "offline"
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # also put attacked/ (save_attacked=true: the attacked checkpoint, GBs) in the artifact
    log_attacked: bool = False

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("offline", "online", "disabled"))
        self._run: Any = None
        self._run_dir: Optional[Path] = None

    def validate_environment(self) -> None:
        """wandb is installed (found without importing it)."""
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logger", "wandb", "none, or install the extra: pip install 'qexp[wandb]'"
            )

    def check_spec(self, spec: Any) -> None:
        """`log_attacked` needs the checkpoint written (`save_attacked=true`)."""
        check(
            not self.log_attacked or spec.run.save_attacked,
            "logger.log_attacked",
            True,
            "false, or true with save_attacked=true (attacked/ is written only then)",
        )

    def start(self, config: dict, run_dir: Path, job_name: str, group: str | None = None) -> None:
        """Open the run under `<run_dir>/wandb/` (tags from the config's options)."""
        import wandb

        self._run_dir = Path(run_dir)
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            group=self.group or group,
            job_type=self.job_type or "+".join(config.get("conditions", [])),
            tags=tags_of(config, self.tags),
            name=job_name,
            config=config,
            dir=str(run_dir),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_condition(self, condition: str, metrics: dict[str, Any], records: list[dict]) -> None:
        """The condition's numeric metrics (history and summary) and its generations table."""
        import wandb

        flat = {f"{condition}/{k}": v for k, v in metrics.items() if is_number(v)}
        self._run.log(flat)
        self._run.summary.update(flat)
        if records:
            cols = [c for c in TABLE_COLUMNS if any(c in r for r in records)]
            table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in records])
            self._run.log({f"{condition}/generations": table})

    def finish(self, status: str, results: dict | None = None, run_dir: Path | None = None) -> None:
        """Summary, images and artifact of the job, then close the run (exit code 1 unless
        `complete`). A failure to log them is a warning: the job's own status stands."""
        if self._run is None:
            return
        run_dir = Path(run_dir) if run_dir is not None else self._run_dir
        try:
            if results is None and run_dir is not None:
                results = read_results(run_dir)
            self._run.summary.update(summary_of(results))
            if run_dir is not None:
                self.log_images(run_dir)
                self.log_artifact(run_dir, results, status)
        except Exception:
            log.warning("W&B: the job's results were not all logged", exc_info=True)
        finally:
            self._run.summary["status"] = status
            self._run.finish(exit_code=0 if status == "complete" else 1)
            self._run = None

    def log_images(self, run_dir: Path) -> None:
        """Every PNG of the job as a W&B image (`plots/<relative path>`), in one step."""
        import wandb

        images = images_in(run_dir)
        if images:
            self._run.log({k: wandb.Image(str(p)) for k, p in images.items()})

    def log_artifact(self, run_dir: Path, results: dict | None, status: str) -> None:
        """Artifact `results-<run id>` (type `qexp-results`): results.json, generations/*.jsonl
        and, with `log_attacked`, attacked/. The run dir's files are final here, so they are
        referenced in place (`immutable`), not copied to wandb's staging dir."""
        import wandb

        art = wandb.Artifact(
            f"results-{self._run.id}",
            type="qexp-results",
            description="qexp job: results.json and generations",
            metadata={"status": status, "run_dir": str(run_dir)},
        )
        if (run_dir / "results.json").is_file():
            art.add_file(str(run_dir / "results.json"), name="results.json", policy="immutable")
        elif results is not None:
            with art.new_file("results.json", mode="w", encoding="utf-8") as f:
                json.dump(results, f, indent=2, default=str)
        for p in sorted((run_dir / "generations").glob("*.jsonl")):
            art.add_file(str(p), name=f"generations/{p.name}", policy="immutable")
        attacked = run_dir / "attacked"
        if self.log_attacked:
            if attacked.is_dir():
                art.add_dir(str(attacked), name="attacked", skip_cache=True, policy="immutable")
            else:
                log.warning("W&B: logger.log_attacked=true but %s does not exist", attacked)
        if art.manifest.entries:
            self._run.log_artifact(art)


def read_results(run_dir: Path) -> dict | None:
    """results.json of `run_dir`, or None when it is missing or unreadable."""
    try:
        return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
