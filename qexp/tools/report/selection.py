"""`--val DIR --select COND.METRIC`: choose on a validation sweep, report on the test sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qexp import CONDITIONS
from qexp.core.io import read_jsonl
from qexp.tools.report.jobs import Job, ReportError
from qexp.tools.report.sweep import _flatten, canonical, swept_params
from qexp.tools.report.tables import LABELS, LOWER_IS_BETTER, fmt, markdown_table, present


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
                    "test split. Run the validation sweep on other items (see qexp.tools.report)."
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
