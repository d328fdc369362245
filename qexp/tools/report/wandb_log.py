"""`--wandb`: the report as one W&B run (tables and plot images)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from qexp.tools.report import matrix
from qexp.tools.report.jobs import Job
from qexp.tools.report.selection import Selection


def log_wandb(
    root: Path,
    args: argparse.Namespace,
    cols: list[str],
    rows: list[dict],
    failed: list[Job],
    plots: list[Path],
    sel: Selection | None,
    params: list[str],
    matrix_rows: list[dict] | None = None,
) -> None:
    """One W&B run (job_type=report, group=sweep dir name): tables (the matrix's too) and
    plot images (its heatmaps too)."""
    import wandb

    group = args.wandb_group or (
        f"{root.parent.name}_{root.name}"
        if re.fullmatch(r"\d\d-\d\d-\d\d", root.name)
        else root.name
    )
    run = wandb.init(
        project=args.wandb_project,
        entity=args.wandb_entity,
        mode=args.wandb_mode,
        job_type="report",
        group=group,
        name=f"report-{group}",
        dir=str(root),
        config={"multirun_dir": str(root), "swept": params, "select": args.select},
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:

        def cell(v: Any) -> Any:
            return v if v is None or isinstance(v, (int, float)) else str(v)

        payload: dict[str, Any] = {
            "report": wandb.Table(columns=cols, data=[[cell(r.get(c)) for c in cols] for r in rows])
        }
        if failed:
            payload["incomplete"] = wandb.Table(
                columns=["job", "status", "error"],
                data=[[j.name, j.status, j.error] for j in failed],
            )
        if matrix_rows:
            mc = matrix.COLS
            payload["matrix"] = wandb.Table(
                columns=mc, data=[[cell(r.get(c)) for c in mc] for r in matrix_rows]
            )
        for p in plots:
            payload[f"plots/{p.stem}"] = wandb.Image(str(p))
        run.log(payload)
        if sel is not None:
            run.summary["selection"] = sel.to_json()
    finally:
        run.finish()
