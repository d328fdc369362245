"""The `qexp` command: one Hydra job = one four-condition pipeline.

In a sweep (`-m`), a job whose run dir already holds a complete results.json for the same
resolved config is skipped (re-running an interrupted sweep with the same `hydra.sweep.dir`
finishes only what is missing), and a job that fails marks itself failed in its results.json
and the sweep goes on (in experiment=matrix a config error marks the cell "n/a": that
combination does not apply); the sweep callback (qexp/pipeline/callbacks.py, configured in
conf/config.yaml for every launcher) exits 1 at the end if any job failed.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qexp.core.console import console
from qexp.core.errors import ConfigError
from qexp.core.io import atomic_write_json
from qexp.core.registry import CONF_DIR, compose_overrides, parse_args

if TYPE_CHECKING:
    from qexp.pipeline.results import Results

con = console("qexp")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> None:
    """Hydra entry point."""
    from qexp.pipeline.run import AlreadyComplete

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        try:
            job(cfg)
        except AlreadyComplete as e:
            con.warning("qexp: %s: complete in %s, skipped", job_name(), e)
        except ConfigError as e:
            fail(e)
        return
    sweep_job(cfg)


def job_name() -> str:
    """The running Hydra job's name: its override dirname, else `qexp`."""
    hc = HydraConfig.get()
    return hc.job.override_dirname or hc.job.name


def job(cfg: DictConfig) -> Results:
    """One run in the running Hydra job's directory (the command line's and `qexp.run`'s
    task). Raises AlreadyComplete when that directory already holds this run."""
    from qexp.pipeline.run import run  # torch & co. load only once a job runs

    return run(cfg, Path(HydraConfig.get().runtime.output_dir), job_name=job_name())


def sweep_job(cfg: DictConfig) -> None:
    """One job of a sweep: a failure is recorded in its results.json, the sweep goes on."""
    from qexp.pipeline.run import AlreadyComplete, run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    name = job_name()
    # W&B group: one per sweep, "<experiment>:<sweep dir name>" or the sweep dir name
    experiment = hc.runtime.choices.get("experiment")
    group = Path(hc.sweep.dir).name
    if experiment not in (None, "null"):
        group = f"{experiment}:{group}"
    try:
        run(cfg, run_dir, job_name=name, group=group)
    except AlreadyComplete:
        con.warning("qexp: %s: complete in %s, skipped", name, run_dir)
    except Exception as e:  # the sweep goes on; results.json says what happened
        kind = "config error" if isinstance(e, ConfigError) else type(e).__name__
        # a matrix cell whose combination does not apply (e.g. gap under GPTQ) is n/a
        status = "n/a" if isinstance(e, ConfigError) and "matrix" in cfg else "failed"
        if status == "n/a":
            con.warning("qexp: %s: n/a: %s", name, e)
        else:
            con.error("qexp: %s: failed: %s: %s", name, kind, e)
        if not (run_dir / "results.json").is_file():  # failed before the pipeline started
            atomic_write_json(
                run_dir / "results.json",
                {
                    "config": OmegaConf.to_container(cfg, resolve=False),
                    "status": status,
                    "error": f"{kind}: {e}",
                },
            )


def precheck(argv: list[str]) -> None:
    """Mistakes Hydra would answer with a traceback (an unknown option, a key that does not
    exist, an override that does not parse) as one `qexp: config error:` line, exit 2, before
    Hydra starts. Each sweep is checked at every one of its values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = parse_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.config_name:
        return

    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as e:
        why = str(e).strip().splitlines()[0]
        fail(ConfigError("override", " ".join(args.overrides), f"Hydra override syntax ({why})"))
    # qexp's own groups and keys; Hydra checks its own (hydra.*, hydra/...)
    ours = [o for o in overrides if not o.key_or_group.startswith("hydra")]
    runs = [[]]
    for o in ours:
        key = o.get_key_element()
        if o.is_sweep_override():
            runs = [r + [f"{key}={v}"] for r in runs for v in o.sweep_string_iterator()]
        else:
            runs = [r + [o.input_line] for r in runs]
    for flat in runs[:64]:  # a sweep's grid: enough points to meet every value
        try:
            cfg = compose_overrides(flat)
            if "matrix" in cfg:  # its sweep comes from matrix.size: check it is one
                from qexp.pipeline.matrix import check_matrix

                check_matrix(cfg.matrix)
        except ConfigError as e:
            fail(e)
        except (HydraException, OmegaConfBaseException) as e:
            fail(ConfigError("override", " ".join(flat), str(e).strip().splitlines()[0]))


def fail(e: ConfigError) -> None:
    """One line on stderr, exit 2."""
    con.error("qexp: config error: %s", e)
    sys.exit(2)


def show_help() -> None:
    """`--help` as Hydra writes it, without the directories of shared config parts
    (conf/<group>/base/: defaults a group's options compose, not options to choose)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        app()
    lines = out.getvalue().splitlines()
    con.info("%s", "\n".join(ln for ln in lines if not re.match(r"^\w+/base: ", ln)))


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        show_help()
        return
    precheck(argv)
    app()


if __name__ == "__main__":
    main()
