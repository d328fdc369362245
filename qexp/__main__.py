"""`python -m qexp ...` / `qexp ...`: one Hydra job = one four-condition pipeline.

In a sweep (`-m`), a job whose run dir already holds a complete results.json for the same
resolved config is skipped (re-running an interrupted sweep with the same `hydra.sweep.dir`
finishes only what is missing), and a job that fails marks itself failed in its results.json
and the sweep goes on; the process exits 1 at the end if any job failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qexp.errors import ConfigError
from qexp.io import atomic_write_json
from qexp.run import run

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
FAILED: list[str] = []  # jobs of this process's sweep that failed


def already_complete(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether run_dir holds a complete results.json made from this very config."""
    path = run_dir / "results.json"
    if not path.is_file():
        return False
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return body.get("status") == "complete" and body.get("config") == OmegaConf.to_container(
        cfg, resolve=True
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    """Hydra entry point."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or hc.job.name
    if hc.mode != RunMode.MULTIRUN:
        try:
            run(cfg, run_dir, job_name=name)
        except ConfigError as e:
            print(f"qexp: config error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    # W&B group: one per sweep, "<experiment>:<sweep dir name>" or the sweep dir name
    experiment = hc.runtime.choices.get("experiment")
    group = Path(hc.sweep.dir).name
    if experiment not in (None, "null"):
        group = f"{experiment}:{group}"
    if already_complete(cfg, run_dir):
        print(f"qexp: {name}: complete in {run_dir}, skipped", file=sys.stderr)
        return
    try:
        run(cfg, run_dir, job_name=name, group=group)
    except Exception as e:  # the sweep goes on; results.json says what happened
        FAILED.append(name)
        kind = "config error" if isinstance(e, ConfigError) else type(e).__name__
        print(f"qexp: {name}: failed: {kind}: {e}", file=sys.stderr)
        if not (run_dir / "results.json").is_file():  # failed before the pipeline started
            atomic_write_json(
                run_dir / "results.json",
                {
                    "config": OmegaConf.to_container(cfg, resolve=False),
                    "status": "failed",
                    "error": f"{kind}: {e}",
                },
            )


def main() -> None:
    """Console-script entry point."""
    app()
    if FAILED:
        print(f"qexp: {len(FAILED)} job(s) failed: {', '.join(FAILED)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
