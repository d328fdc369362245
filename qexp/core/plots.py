"""PNG plots of a run. Figures are built with matplotlib's object API (no pyplot), so
importing qexp never changes the matplotlib backend of a notebook or another program;
matplotlib itself is imported when the first figure is made (importing qexp does not need
it: bench/gpu_smoke.sh runs qexp where only torch and transformers are installed)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from qexp import CONDITIONS
from qexp.core.io import atomic_open

log = logging.getLogger(__name__)


def new_figure(size: tuple[float, float], dpi: int = 110) -> tuple[Figure, Axes]:
    """A detached figure with one axes (rendered by the Agg canvas when saved)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    return fig, fig.subplots()


def error_bars(rows: list[dict], key: str) -> list[list[float]] | None:
    """`yerr` for `Axes.errorbar` / `Axes.bar`: per row the distances from `row[key]` down to
    `row[key + "_lo"]` and up to `row[key + "_hi"]` (0 where a row has no finite interval);
    None when no row has one, so nothing is drawn."""
    below, above, any_ci = [], [], False
    for r in rows:
        v, lo, hi = r.get(key), r.get(f"{key}_lo"), r.get(f"{key}_hi")
        ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (v, lo, hi))
        any_ci |= ok
        below.append(max(0.0, v - lo) if ok else 0.0)
        above.append(max(0.0, hi - v) if ok else 0.0)
    return [below, above] if any_ci else None


def save_png(fig: Figure, path: Path) -> Path:
    """Lay the figure out and write it atomically as PNG."""
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def plot_loglik(run_dir: Path, window: int = 32) -> Path | None:
    """Rolling mean per-token NLL of the reference passage, one line per condition."""
    curves = {}
    for cond in CONDITIONS:
        f = run_dir / "loglik" / f"{cond}.json"
        if f.exists():
            curves[cond] = json.loads(f.read_text())["nll"]
    if not curves:
        return None
    try:
        fig, ax = new_figure((8, 4))
    except ImportError as e:  # a GPU box with torch and transformers alone
        log.warning("loglik.png not drawn (%s); the numbers are in loglik/*.json", e)
        return None
    for cond, nll in curves.items():
        w = max(1, min(window, len(nll)))
        rolling = [sum(nll[i : i + w]) / w for i in range(len(nll) - w + 1)]
        ax.plot(range(w, len(nll) + 1), rolling, label=cond, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("token position in the reference passage")
    ax.set_ylabel(f"NLL (rolling mean over {window} tokens)")
    ax.set_title("Per-token negative log-likelihood by condition")
    ax.legend()
    return save_png(fig, run_dir / "loglik.png")
