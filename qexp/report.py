"""`python -m qexp.report <multirun dir>`: tables and plots of a Hydra sweep.

Reads every job's `results.json` (and `.hydra/overrides.yaml`) at depth <= 2 under the
directory and writes into it:

- `report.csv`: one row per (job, condition): the swept parameters, condition, quantizer
  and the metrics (full precision);
- `report.md`: the same table (4 significant digits), the fixed overrides, the jobs that
  did not complete (with their error) and, with `--select`, the validation-selected job;
- `report_plots/<metric>_vs_<param>.png`: each metric against each swept parameter, one
  line per condition (a grouped bar chart for a non-numeric parameter).

Swept parameters are the overrides whose value differs across jobs (from each job's
`.hydra/overrides.yaml`; without them, the leaves of the resolved configs that differ).

Selection on a separate split (`--val VAL_DIR --select original_q.accuracy:max`): the best
job of the validation sweep by that metric is matched to the test sweep (the positional
directory) by the validation sweep's swept values, and the matched test job's numbers are
reported. Selecting on the test sweep itself is refused (the validation and test jobs must
differ in their resolved `benchmark` config), and shared item ids between the two are
reported as a warning. A validation split today: `benchmark.path=<your val .jsonl>`, or
`benchmark.source=hub benchmark.split=train` for SVAMP from the hub; `benchmark.limit`
only takes a prefix, so it cannot give a disjoint subset of the same items.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexp import CONDITIONS, report_matrix
from qexp.cli import console
from qexp.io import atomic_open, atomic_write_json, atomic_write_text, read_jsonl
from qexp.plots import new_figure, save_png

# (results.json key, Markdown label), in the paper's column order.
METRICS = (
    ("accuracy", "Accuracy"),
    ("cos_sim", "CosSim"),
    ("ref_ppl", "PPL"),
    ("self_ppl", "Self-PPL"),
    ("bertscore_f1", "BERTScore F1"),
    ("max_repeat_3", "MaxRepeat-3"),
    ("seq_rep_4", "Seq-Rep-4"),
    ("injection_rate", "Injection rate"),
    ("refusal_rate", "Refusal rate"),
)
LABELS = dict(METRICS)
# Metrics where lower is better (the default direction of --select).
LOWER_IS_BETTER = ("ppl", "self_ppl", "ref_ppl", "max_repeat_3", "seq_rep_4", "injection_rate")
LOWER_IS_BETTER += ("refusal_rate",)
SKIP_DIRS = {"wandb", "report_plots", "generations", "loglik", "quantized"}
FULL_PRECISION = ("original", "attacked")


class ReportError(Exception):
    """A usage or input problem: printed as `qexp.report: <message>`, exit code 2."""


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


# --------------------------------------------------------------------------- discovery


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


# ----------------------------------------------------------------------- swept values


@functools.cache
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@functools.lru_cache(maxsize=4096)
def parse_value(raw: str) -> Any:
    """An override's value as Hydra parses it (`1e-5` -> 1e-05, `[2,2]` -> [2, 2]).

    Cached: callers must not modify the returned value.
    """
    try:
        return _parser().parse_overrides([f"k={raw}"])[0].value()
    except Exception:  # anything Hydra cannot parse stays a string
        return raw


def numeric(raw: str | None) -> float | None:
    """A swept value as a number: a number, or a list of equal numbers (`[8,8]` -> 8)."""
    if raw is None:
        return None
    v = parse_value(raw)
    if isinstance(v, list) and v and all(x == v[0] for x in v):
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def canonical(raw: str | None) -> str:
    """A value's identity for matching jobs across sweeps (`1e-4` == `0.0001`)."""
    if raw is None:
        return "<unset>"
    return json.dumps(parse_value(raw), sort_keys=True, default=str)


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, default=str) if not isinstance(d, str) else d}


def swept_params(jobs: list[Job]) -> tuple[list[str], str]:
    """The parameters that differ across jobs (ordered), and where they came from."""
    if all(j.overrides is not None for j in jobs):
        source, values = "overrides", [j.overrides for j in jobs]
    else:
        source, values = "configs", [_flatten(j.config) if j.results else {} for j in jobs]
        values = [v for v in values if v]
    keys: list[str] = []
    for v in values:
        keys += [k for k in v if k not in keys]
    params = [k for k in keys if len({canonical(v.get(k)) for v in values}) > 1]
    for j in jobs:
        flat = j.overrides if source == "overrides" else _flatten(j.config)
        j.swept = {k: flat.get(k) for k in params}
    return params, source


def fixed_overrides(jobs: list[Job], params: list[str]) -> list[str]:
    """The overrides every job shares (context for the reader)."""
    if not jobs or any(j.overrides is None for j in jobs):
        return []
    first = jobs[0].overrides
    return [f"{k}={v}" for k, v in first.items() if k not in params]


# -------------------------------------------------------------------------- the table


def param_col(p: str) -> str:
    """A swept parameter's column (`quantizer (swept)` beside the derived `quantizer`)."""
    return f"{p} (swept)" if p in ("job", "condition", "quantizer") else p


def quantizer_name(job: Job, condition: str) -> str:
    """The quantizer behind a condition (`none` for the full-precision ones)."""
    if condition in FULL_PRECISION:
        return "none"
    q = job.config.get("quantizer") or {}
    return str(q.get("name", "?")) if isinstance(q, dict) else str(q)


def table_rows(jobs: list[Job], params: list[str], metrics: list[str]) -> list[dict]:
    """One row per (complete job, condition), conditions in the canonical order."""
    rows = []
    for j in jobs:
        if j.status != "complete":
            continue
        conds = j.conditions
        order = [c for c in CONDITIONS if c in conds] + sorted(set(conds) - set(CONDITIONS))
        for c in order:
            row = {"job": j.name, **{param_col(p): j.swept.get(p) for p in params}}
            row.update(condition=c, quantizer=quantizer_name(j, c))
            row.update({m: conds[c].get(m) for m in metrics})
            rows.append(row)
    return rows


def present(rows: list[dict], metrics: list[str]) -> list[str]:
    """The metrics with at least one value."""
    return [m for m in metrics if any(r.get(m) is not None for r in rows)]


def fmt(v: Any) -> str:
    """A Markdown cell: 4 significant digits for floats, `-` when absent."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]], numeric_from: int) -> str:
    """A GitHub-flavoured table; columns from `numeric_from` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    """Atomic CSV, floats at full precision, absent values empty."""
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])


# ---------------------------------------------------------------------------- plots


def log_scale(values: list[float | None]) -> bool:
    """A log axis: all values positive and spanning at least two decades."""
    vals = [v for v in values if v is not None]
    pos = [v for v in vals if v > 0 and math.isfinite(v)]
    return bool(pos) and len(pos) == len(vals) and max(pos) / min(pos) >= 100


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def make_plots(
    root: Path, rows: list[dict], params: list[str], metrics: list[str]
) -> tuple[list[Path], list[str]]:
    """PNGs of every metric against every swept parameter; returns (files, notes)."""
    if not rows or not params:
        return [], (["no swept parameter: no plots"] if rows else [])
    out_dir, files, notes = root / "report_plots", [], []
    for p in params:
        pc = param_col(p)
        others = [param_col(q) for q in params if q != p]
        xs = {r[pc]: numeric(r[pc]) for r in rows}
        is_num = all(v is not None for v in xs.values())
        for m in metrics:
            pts = [r for r in rows if r.get(m) is not None and isinstance(r[m], (int, float))]
            if not pts:
                continue
            series: dict[str, list[dict]] = {}
            for r in pts:
                label = r["condition"] + "".join(f", {q}={r[q]}" for q in others)
                series.setdefault(label, []).append(r)
            fig, ax = new_figure((7, 4))
            if is_num:
                for label, rs in series.items():
                    rs = sorted(rs, key=lambda r: xs[r[pc]])
                    ax.plot([xs[r[pc]] for r in rs], [r[m] for r in rs], marker="o", label=label)
                if log_scale(list(xs.values())):
                    ax.set_xscale("log")
            else:
                cats = list(dict.fromkeys(r[pc] for r in rows))
                width = 0.8 / len(series)
                for i, (label, rs) in enumerate(series.items()):
                    by = {r[pc]: r[m] for r in rs}
                    pos = [k for k, c in enumerate(cats) if c in by]
                    ax.bar(
                        [k - 0.4 + width * (i + 0.5) for k in pos],
                        [by[cats[k]] for k in pos],
                        width=width,
                        label=label,
                    )
                ax.set_xticks(range(len(cats)), [str(c) for c in cats])
            if log_scale([r[m] for r in pts]):
                ax.set_yscale("log")
            ax.set_xlabel(p)
            ax.set_ylabel(LABELS.get(m, m))
            ax.set_title(f"{LABELS.get(m, m)} vs {p}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            path = out_dir / f"{_safe(m)}_vs_{_safe(p)}.png"
            files.append(save_png(fig, path))
        if not is_num:
            notes.append(f"{p} is not numeric: grouped bar charts")
    return files, notes


# ------------------------------------------------------------------------ selection


@dataclass
class Selection:
    """The outcome of `--select` (also written to selection.json)."""

    spec: str
    condition: str
    metric: str
    direction: str
    val_dir: str
    params: list[str]
    groups: list[dict]  # one per --per group: chosen val job, its value, matched test jobs

    def to_json(self) -> dict:
        return self.__dict__


def parse_select(spec: str) -> tuple[str, str, str]:
    """`condition.metric[:max|min]` -> (condition, metric, direction)."""
    body, _, direction = spec.partition(":")
    condition, _, metric = body.partition(".")
    if not condition or not metric:
        raise ReportError(f"--select {spec!r}: expected CONDITION.METRIC[:max|min]")
    if not direction:
        direction = "min" if metric in LOWER_IS_BETTER else "max"
    if direction not in ("max", "min"):
        raise ReportError(f"--select {spec!r}: direction must be max or min")
    return condition, metric, direction


def _item_ids(job: Job, condition: str) -> set[str] | None:
    f = job.path / "generations" / f"{condition}.jsonl"
    if not f.is_file():
        return None
    return {str(r.get("id")) for r in read_jsonl(f)}


def select(
    val_jobs: list[Job], test_jobs: list[Job], spec: str, per: list[str], val_dir: str
) -> Selection:
    """Best validation job(s) by `spec`, matched to the test sweep by swept values."""
    condition, metric, direction = parse_select(spec)
    params, _ = swept_params(val_jobs)
    if not params:
        raise ReportError(f"--val {val_dir}: the validation jobs share every override")
    bad = [p for p in per if p not in params]
    if bad:
        raise ReportError(f"--per {','.join(bad)}: not swept in --val (swept: {params})")
    test_keys = []
    for t in test_jobs:
        src = t.overrides if t.overrides is not None else _flatten(t.config)
        test_keys.append((t, tuple(canonical(src.get(p)) for p in params)))

    groups: dict[tuple, list[tuple[Job, float]]] = {}
    for j in val_jobs:
        v = j.conditions.get(condition, {}).get(metric)
        if j.status != "complete" or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        groups.setdefault(tuple(canonical(j.swept[p]) for p in per), []).append((j, float(v)))
    if not groups:
        raise ReportError(f"--select {spec}: no complete validation job has {condition}.{metric}")
    out = []
    for cands in groups.values():
        best = (max if direction == "max" else min)(v for _, v in cands)
        tied = [j for j, v in cands if v == best]
        chosen = tied[0]
        key = tuple(canonical(chosen.swept[p]) for p in params)
        matched = [t for t, k in test_keys if k == key]
        tests = []
        for t in matched:
            bench_v, bench_t = chosen.config.get("benchmark"), t.config.get("benchmark")
            if bench_v and bench_v == bench_t:
                raise ReportError(
                    f"validation job {chosen.name} and test job {t.name} have the same "
                    "benchmark config, so they evaluate the same items: selection on the "
                    "test split. Run the validation sweep on other items (see qexp.report)."
                )
            v_ids, t_ids = _item_ids(chosen, condition), _item_ids(t, condition)
            overlap = None if v_ids is None or t_ids is None else len(v_ids & t_ids)
            tests.append(
                {
                    "job": t.name,
                    "status": t.status,
                    "error": t.error or None,
                    "metrics": t.conditions,
                    "item_overlap": overlap,
                    "n_val_items": None if v_ids is None else len(v_ids),
                }
            )
        out.append(
            {
                "per": {p: chosen.swept[p] for p in per},
                "chosen": {p: chosen.swept[p] for p in params},
                "val_job": chosen.name,
                "val_value": best,
                "ties": [j.name for j in tied[1:]],
                "val_candidates": len(cands),
                "val_scores": [
                    {"values": {p: j.swept[p] for p in params}, "value": v} for j, v in cands
                ],
                "test": tests,
            }
        )
    return Selection(spec, condition, metric, direction, val_dir, params, out)


def selection_markdown(sel: Selection, metrics: list[str]) -> tuple[str, list[str]]:
    """The selection section of report.md, and warnings for stderr."""
    warn = []
    lines = [
        "## Selection on the validation split",
        "",
        f"Best `{sel.condition}.{sel.metric}` ({sel.direction}) among the complete jobs of "
        f"`{sel.val_dir}`, matched to this sweep by {', '.join(f'`{p}`' for p in sel.params)}.",
        "",
    ]
    rows = []
    for g in sel.groups:
        chosen = ", ".join(f"{k}={v}" for k, v in g["chosen"].items())
        lines.append(
            f"- chosen: `{chosen}` (validation {sel.metric} = {fmt(g['val_value'])}, "
            f"{g['val_candidates']} candidates"
            + (f"; tied with {', '.join(g['ties'])}, the first job wins" if g["ties"] else "")
            + ")"
        )
        scores = "; ".join(
            ", ".join(f"{k}={v}" for k, v in c["values"].items()) + f": {fmt(c['value'])}"
            for c in g["val_scores"]
        )
        lines.append(f"  - validation {sel.metric}: {scores}")
        if not g["test"]:
            lines.append("  - no test job with these values")
            warn.append(f"no test job matches {chosen}")
        for t in g["test"]:
            if t["item_overlap"]:
                msg = (
                    f"{t['item_overlap']} of {t['n_val_items']} validation item ids also appear "
                    f"in test job {t['job']}: the splits overlap (unless the two data sources "
                    "number their items independently)"
                )
                lines.append(f"  - WARNING: {msg}")
                warn.append(msg)
            elif t["item_overlap"] is None:
                lines.append("  - item overlap not checked (no generations to compare)")
            if t["status"] != "complete":
                lines.append(f"  - test job {t['job']} is {t['status']}: {t['error']}")
            conds = t["metrics"]
            for c in [c for c in CONDITIONS if c in conds]:
                rows.append({"chosen": chosen, "condition": c, **conds[c]})
    cols = present(rows, metrics)
    if rows:
        lines += [
            "",
            "Test numbers of the selected job(s):",
            "",
            markdown_table(
                ["chosen", "condition", *(LABELS.get(m, m) for m in cols)],
                [[r["chosen"], r["condition"], *(r.get(m) for m in cols)] for r in rows],
                2,
            ),
        ]
    return "\n".join(lines), warn


# ------------------------------------------------------------------------------ W&B


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
            mc = report_matrix.COLS
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


# ----------------------------------------------------------------------------- main


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

    pcols = [param_col(p) for p in params]
    csv_cols = ["job", *pcols, "condition", "quantizer", *shown]
    write_csv(root / "report.csv", rows, csv_cols)

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
    md.append("")
    show_job = not params and n_done > 1
    head = (["job"] if show_job else []) + pcols + ["condition", "quantizer"]
    md.append(
        markdown_table(
            head + [LABELS.get(m, m) for m in shown],
            [
                [short_name(r[c]) if c == "job" else r[c] for c in head] + [r.get(m) for m in shown]
                for r in rows
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

    plots, notes = ([], []) if args.no_plots else make_plots(root, rows, params, shown)
    matrix_rows: list[dict] = []
    if report_matrix.is_matrix(root, jobs):
        matrix_rows, heatmaps, matrix_md = report_matrix.write(root, jobs, not args.no_plots)
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


if __name__ == "__main__":
    sys.exit(main())
