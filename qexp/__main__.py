"""`python -m qexp ...` / `qexp ...`: one Hydra job = one four-condition pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qexp.errors import ConfigError
from qexp.run import run

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    """Hydra entry point."""
    hc = HydraConfig.get()
    try:
        run(cfg, Path(hc.runtime.output_dir), job_name=hc.job.override_dirname or hc.job.name)
    except ConfigError as e:
        if hc.mode == RunMode.MULTIRUN:
            raise
        print(f"qexp: config error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
