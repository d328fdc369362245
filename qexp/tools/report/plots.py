"""Each metric against each swept parameter, one line (or bar group) per condition."""

from __future__ import annotations

import math
import re
from pathlib import Path

from qexp.core.plots import new_figure, save_png
from qexp.tools.report.sweep import numeric
from qexp.tools.report.tables import LABELS, param_col


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
