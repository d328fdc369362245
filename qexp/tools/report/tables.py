"""The report's table: one row per (job, condition), as CSV and Markdown."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from qexp import CONDITIONS
from qexp.core.io import atomic_open
from qexp.tools.report.jobs import Job, short_name

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
FULL_PRECISION = ("original", "attacked")


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
    """One row per (complete job, condition), conditions in the canonical order; a metric
    `m` with a 95% interval in results.json has it as `m_lo`, `m_hi`."""
    rows = []
    for j in jobs:
        if j.status != "complete":
            continue
        conds = j.conditions
        intervals = (j.results or {}).get("intervals") or {}
        order = [c for c in CONDITIONS if c in conds] + sorted(set(conds) - set(CONDITIONS))
        for c in order:
            row = {"job": j.name, **{param_col(p): j.swept.get(p) for p in params}}
            row.update(condition=c, quantizer=quantizer_name(j, c))
            for m in metrics:
                row[m] = conds[c].get(m)
                ci = intervals.get(c, {}).get(m)
                if row[m] is not None and ci and ci.get("lo") is not None:
                    row[f"{m}_lo"], row[f"{m}_hi"] = ci["lo"], ci["hi"]
            rows.append(row)
    return rows


def seed_rows(rows: list[dict], params: list[str], metrics: list[str]) -> list[dict]:
    """Runs that differ only in `seed`, one row per (other swept values, condition): each
    metric's mean over seeds with `m_sd`, `m_n` and the t interval `m_lo`, `m_hi`
    (qexp/core/stats.py `seed_summary`); `seed` reads `mean of N`."""
    from qexp.core.stats import seed_summary

    others = [param_col(p) for p in params if p != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((*(str(r[c]) for c in others), r["condition"]), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        row = {c: first[c] for c in (*others, "condition", "quantizer")}
        row["job"] = ", ".join(short_name(r["job"]) for r in members)
        row[param_col("seed")] = f"mean of {len(members)}"
        for m in metrics:
            values = [r[m] for r in members if isinstance(r.get(m), (int, float))]
            if not values:
                row[m] = None
                continue
            s = seed_summary(values)
            row.update({m: s["mean"], f"{m}_sd": s["sd"], f"{m}_n": s["n"]})
            if s["lo"] is not None:
                row[f"{m}_lo"], row[f"{m}_hi"] = s["lo"], s["hi"]
        out.append(row)
    return out


def cell(row: dict, m: str) -> str:
    """A metric's Markdown cell: `0.333 [0.217, 0.475]` with its interval; over seeds
    `0.325 ± 0.035 [0.007, 0.643]` (mean ± sd [t interval])."""
    v = row.get(m)
    if not isinstance(v, float):
        return fmt(v)
    text = fmt(v)
    if row.get(f"{m}_sd") is not None:
        text += f" ± {row[f'{m}_sd']:.2g}"
    if row.get(f"{m}_lo") is not None:
        text += f" [{row[f'{m}_lo']:.3g}, {row[f'{m}_hi']:.3g}]"
    return text


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
