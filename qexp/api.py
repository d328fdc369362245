"""qexp from Python: `qexp.run(overrides)` runs one job as the command line does, and
`qexp.load(path)` reads a run or a sweep directory into a pandas DataFrame.

    import qexp

    res = qexp.run(["attack=encrypt", "benchmark.limit=16", "logger=none"])
    res.conditions["attacked_q"]["ref_ppl"], res.intervals["attacked_q"]["ref_ppl"]
    df = qexp.load(res.run_dir)          # one row per run × condition × metric
    df = qexp.load("multirun/2026-12-07/10-00-00")   # a sweep: its varying keys as columns
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from qexp.pipeline.results import Results

log = logging.getLogger(__name__)
ID_COLUMNS = ("run", "status", "aggregate", "condition", "metric")
STAT_COLUMNS = ("value", "lo", "hi", "interval", "n", "sd", "n_seeds")


def run(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> Results:
    """Run one qexp job with command-line `overrides` (e.g. `["attack=encrypt"]`): the same
    config, run directory (`outputs/<date>/<time>`, or `run_dir`), stage cache, results.json,
    generations/, plots, job log and logger as `python -m qexp ...`. A sweep (`-m`, `a=1,2`)
    is the command line's. Raises ConfigError (naming the key, the value and what is
    allowed) before any work for a bad override; a directory that already holds this very
    run is not run again: its results are read back."""
    from qexp.app import job
    from qexp.core.registry import compose_overrides, run_job
    from qexp.pipeline.results import Results
    from qexp.pipeline.run import AlreadyComplete

    ovr = [str(o) for o in overrides]
    if run_dir is not None:
        ovr.append(f"hydra.run.dir={Path(run_dir).expanduser().resolve()}")
    compose_overrides([o for o in ovr if not o.startswith("hydra.")])  # errors before work

    def task(cfg: Any) -> Results:
        try:
            return job(cfg)
        except AlreadyComplete as e:
            log.warning("qexp: %s holds this run already (complete): read back", e)
            return Results.read(Path(str(e)))

    return run_job(task, ovr)


def load(path: str | Path) -> pd.DataFrame:
    """The results under `path` (a run directory or a sweep directory) as a long DataFrame:
    one row per run × condition × metric with `value`, its 95% interval `lo`, `hi`
    (`interval` names the method, `n` the items), the config keys that vary across the runs
    (typed as Hydra parses them) and `status`. Runs that differ only in `seed` also get an
    aggregated row per (other keys, condition, metric): `aggregate=True`, `value` the mean,
    `sd`, `n_seeds` and the t interval of the mean in `lo`, `hi`."""
    import pandas as pd

    from qexp.tools.report.jobs import ReportError, discover
    from qexp.tools.report.sweep import parse_value, swept_params

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    jobs = [j for j in discover(root) if j.results is not None]
    if not jobs:
        raise ReportError(f"{root}: no results.json found")
    params, _ = swept_params(jobs)
    rows: list[dict[str, Any]] = []
    for j in jobs:
        swept = {p: parse_value(j.swept[p]) if j.swept.get(p) is not None else None for p in params}
        intervals = j.results.get("intervals") or {}
        for cond, metrics in j.conditions.items():
            for metric, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                ci = intervals.get(cond, {}).get(metric) or {}
                rows.append(
                    {
                        "run": j.name,
                        "status": j.status,
                        "aggregate": False,
                        **swept,
                        "condition": cond,
                        "metric": metric,
                        "value": float(value),
                        "lo": ci.get("lo"),
                        "hi": ci.get("hi"),
                        "interval": ci.get("method"),
                        "n": ci.get("n"),
                    }
                )
    if "seed" in params:
        rows += _over_seeds(rows, [p for p in params if p != "seed"])
    frame = pd.DataFrame(rows)
    order = [c for c in (*ID_COLUMNS[:3], *params, *ID_COLUMNS[3:], *STAT_COLUMNS) if c in frame]
    return frame[order]


def _over_seeds(rows: list[dict], others: list[str]) -> list[dict]:
    """One aggregated row per (other swept keys, condition, metric) of complete runs."""
    from qexp.core.stats import seed_summary

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "complete":
            key = (*(repr(r[p]) for p in others), r["condition"], r["metric"])
            groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        s = seed_summary([r["value"] for r in members])
        first = members[0]
        out.append(
            {
                "run": "mean over seeds",
                "status": "complete",
                "aggregate": True,
                **{p: first[p] for p in others},
                "seed": None,
                "condition": first["condition"],
                "metric": first["metric"],
                "value": s["mean"],
                "lo": s["lo"],
                "hi": s["hi"],
                "interval": "t over seeds",
                "sd": s["sd"],
                "n_seeds": s["n"],
            }
        )
    return out
