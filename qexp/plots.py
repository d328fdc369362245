"""PNG plots of a run (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qexp import CONDITIONS  # noqa: E402


def plot_loglik(run_dir: Path, window: int = 32) -> Path | None:
    """Rolling mean per-token NLL of the reference passage, one line per condition."""
    curves = {}
    for cond in CONDITIONS:
        f = run_dir / "loglik" / f"{cond}.json"
        if f.exists():
            curves[cond] = json.loads(f.read_text())["nll"]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for cond, nll in curves.items():
        w = max(1, min(window, len(nll)))
        rolling = [sum(nll[i : i + w]) / w for i in range(len(nll) - w + 1)]
        ax.plot(range(w, len(nll) + 1), rolling, label=cond, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("token position in the reference passage")
    ax.set_ylabel(f"NLL (rolling mean over {window} tokens)")
    ax.set_title("Per-token negative log-likelihood by condition")
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loglik.png"
    fig.savefig(out)
    plt.close(fig)
    return out
