"""Weights & Biases logging, offline by default (`logger.mode=online` to sync)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from qexp.core.errors import ConfigError, check_choice
from qexp.loggers.base import Logger

TABLE_COLUMNS = ["id", "prompt", "output", "parsed", "gold", "correct", "injected", "refused"]


@dataclass
class WandbLogger(Logger):
    """One W&B run per job: metrics under `<condition>/<metric>`, generation tables, config."""

    name: str = "wandb"
    project: str = "qexp"
    entity: Optional[str] = None
    mode: str = "offline"
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("offline", "online", "disabled"))
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "logger", "wandb", "none, or install the extra: pip install 'qexp[wandb]'"
            ) from None
        self._run = None

    def start(self, config: dict, run_dir: Path, job_name: str, group: str | None = None) -> None:
        import wandb

        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            group=self.group or group,
            job_type=self.job_type or "+".join(config.get("conditions", [])),
            tags=self.tags,
            name=job_name,
            config=config,
            dir=str(run_dir),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_condition(self, condition: str, metrics: dict[str, Any], records: list[dict]) -> None:
        import wandb

        flat = {
            f"{condition}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, bool))
        }
        self._run.log(flat)
        self._run.summary.update(flat)
        if records:
            cols = [c for c in TABLE_COLUMNS if any(c in r for r in records)]
            table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in records])
            self._run.log({f"{condition}/generations": table})

    def finish(self, status: str) -> None:
        if self._run is not None:
            self._run.summary["status"] = status
            self._run.finish(exit_code=0 if status == "complete" else 1)
            self._run = None
