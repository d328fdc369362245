"""The `qexp-report` command: read a sweep, write report.csv, report.md and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from qexp.core.console import console
from qexp.core.io import atomic_write_json, atomic_write_text
from qexp.tools.report import matrix
from qexp.tools.report.jobs import ReportError, discover, short_name
from qexp.tools.report.plots import make_plots
from qexp.tools.report.selection import select, selection_markdown
from qexp.tools.report.sweep import fixed_overrides, swept_params
from qexp.tools.report.tables import (
    LABELS,
    METRICS,
    cell,
    markdown_table,
    param_col,
    present,
    seed_rows,
    table_rows,
    write_csv,
)
from qexp.tools.report.wandb_log import log_wandb


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qexp-report",
        description="CSV/Markdown tables and plots of a qexp multirun directory.",
    )
    ap.add_argument("dir", type=Path, help="multirun dir (the test sweep when --val is given)")
    ap.add_argument(
        "--metrics",
        help="comma-separated metric keys (default: "
        + ",".join(k for k, _ in METRICS)
        + "; only those with a value are shown)",
    )
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--val", type=Path, help="validation multirun dir for --select")
    ap.add_argument(
        "--select",
        metavar="COND.METRIC[:max|min]",
        help="pick the best --val job by this metric (e.g. original_q.accuracy:max; default "
        "direction: min for perplexities, repetition, injection/refusal, else max) and report "
        "the matching job of DIR",
    )
    ap.add_argument(
        "--per",
        default="",
        help="comma-separated swept params: select separately for each of their values",
    )
    ap.add_argument("--wandb", action="store_true", help="also log the report to W&B")
    ap.add_argument("--wandb-project", default="qexp")
    ap.add_argument("--wandb-entity", default=None)
    ap.add_argument("--wandb-mode", default="offline", choices=("offline", "online"))
    ap.add_argument("--wandb-group", default=None, help="default: the sweep dir name")
    return ap


def report(args: argparse.Namespace) -> int:
    root: Path = args.dir
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory")
    if bool(args.select) != bool(args.val):
        raise ReportError(
            "--select and --val go together: σ*-style selection is made on a validation "
            "sweep (--val DIR) and reported on the test sweep; selecting on the test sweep "
            "itself is not supported"
        )
    jobs = discover(root)
    if not any(j.results is not None for j in jobs):
        raise ReportError(f"{root}: no results.json found (looked {2} levels deep)")
    metrics = args.metrics.split(",") if args.metrics else [k for k, _ in METRICS]
    params, source = swept_params(jobs)
    rows = table_rows(jobs, params, metrics)
    shown = present(rows, metrics)
    failed = [j for j in jobs if j.status not in ("complete", "n/a")]
    # runs that differ only in seed: the table and plots show their mean over seeds
    seeds = seed_rows(rows, params, shown) if "seed" in params else []
    shown_rows = seeds or rows

    pcols = [param_col(p) for p in params]
    stat_cols = [f"{m}_{s}" for m in shown for s in ("lo", "hi", "sd", "n")]
    csv_cols = ["job", *pcols, "condition", "quantizer", *shown]
    csv_cols += [c for c in stat_cols if any(c in r for r in rows + seeds)]
    write_csv(root / "report.csv", rows + seeds, csv_cols)

    n_done = len(jobs) - len(failed)
    md = [f"# qexp report: `{root}`", ""]
    md.append(
        f"{len(jobs)} jobs: {n_done} complete, {len(failed)} not complete. "
        + (
            f"Swept (from {source}): {', '.join(f'`{p}`' for p in params)}."
            if params
            else "No swept parameter."
        )
    )
    fixed = fixed_overrides(jobs, params)
    if fixed:
        md.append("Fixed overrides: " + " ".join(f"`{o}`" for o in fixed) + ".")
    md.append(
        "Each row aggregates the runs that differ only in `seed`: mean ± sd over seeds "
        "[95% t interval of the mean]; the seeds' own rows are in report.csv."
        if seeds
        else "Brackets: 95% intervals (Wilson for rates, bootstrap over items for means "
        "and perplexities; results.json `intervals`)."
    )
    md.append("")
    show_job = not params and n_done > 1
    head = (["job"] if show_job else []) + pcols + ["condition", "quantizer"]
    md.append(
        markdown_table(
            head + [LABELS.get(m, m) for m in shown],
            [
                [short_name(r[c]) if c == "job" else r[c] for c in head]
                + [cell(r, m) for m in shown]
                for r in shown_rows
            ],
            len(head),
        )
        if rows
        else "_No complete job._"
    )
    if failed:
        md += ["", f"## Jobs that did not complete ({len(failed)})", ""]
        md.append(
            markdown_table(
                ["job", *params, "status", "conditions done", "error"],
                [
                    [j.short, *(j.swept.get(p) for p in params), j.status]
                    + [", ".join(j.conditions) or "-", j.error or "-"]
                    for j in failed
                ],
                99,
            )
        )

    sel, warnings = None, []
    if args.select:
        val_jobs = discover(args.val)
        if not any(j.results is not None for j in val_jobs):
            raise ReportError(f"--val {args.val}: no results.json found")
        per = [p for p in args.per.split(",") if p]
        sel = select(val_jobs, jobs, args.select, per, str(args.val))
        section, warnings = selection_markdown(sel, metrics)
        md += ["", section]
        atomic_write_json(root / "selection.json", sel.to_json())

    plots, notes = (
        ([], [])
        if args.no_plots
        else make_plots(root, shown_rows, [p for p in params if not seeds or p != "seed"], shown)
    )
    matrix_rows: list[dict] = []
    if matrix.is_matrix(root, jobs):
        matrix_rows, heatmaps, matrix_md = matrix.write(root, jobs, not args.no_plots)
        plots += heatmaps
        md += ["", matrix_md.replace("# Attack", "## Attack", 1)]
    if plots:
        md += [
            "",
            f"Plots: {len(plots)} PNG file{'s' if len(plots) != 1 else ''} in `report_plots/`.",
        ]
    text = "\n".join(md) + "\n"
    atomic_write_text(root / "report.md", text)
    con = console("qexp-report")
    con.info("%s", text)
    for n in notes:
        con.info("qexp-report: %s", n)
    for w in warnings:
        con.warning("qexp-report: WARNING: %s", w)
    written = ["report.csv", "report.md"] + (["selection.json"] if sel else [])
    written += ["matrix.csv", "matrix.md"] if matrix_rows else []
    con.info("qexp-report: wrote %s%s", ", ".join(written), " and report_plots/" if plots else "")

    if args.wandb:
        log_wandb(root, args, csv_cols, rows, failed, plots, sel, params, matrix_rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 on a usage or input problem."""
    args = build_parser().parse_args(argv)
    try:
        return report(args)
    except ReportError as e:
        console("qexp-report").error("qexp-report: %s", e)
        return 2
