"""`qexp-report` on an experiment=matrix sweep: heatmaps and the attack × defense table.

Per cell (model, attack, defense, prune, quantizer):
- attack success under the quantizer: a behaviour attack (gap, outlier) by its scenario's
  rate on `attacked_q` (injection_rate / refusal_rate / insecure_code_rate), with the same
  rate in full precision (`attacked`, the stealth: low is stealthy); a collapse attack
  (encrypt) by 1 − ref_ppl(original_q) / ref_ppl(attacked_q), clipped to [0, 1];
- utility cost of the defense, pruning and quantizer on the clean model:
  ref_ppl(original_q) / ref_ppl(original).
A behaviour attack's success carries its 95% Wilson interval (results.json `intervals`) as
`success_lo`, `success_hi`. Cells recorded "n/a" (a combination that does not apply) keep
their reason. Writes matrix.csv, matrix.md and report_plots/matrix_<model>_<quantizer>.png
(matrix_<model>_<prune>_<quantizer>.png for a pruned setting; two panels: success, utility
cost; attacks (y) × defenses (x), each cell's value and, for a rate, its interval in it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from qexp.core.io import atomic_write_text
from qexp.core.plots import new_figure, save_png
from qexp.tools.report.tables import write_csv

RATE = {
    "content_injection": "injection_rate",
    "over_refusal": "refusal_rate",
    "insecure_code": "insecure_code_rate",
}
COLS = ["model", "attack", "defense", "prune", "quantizer", "status", "goal", "success"]
COLS += ["success_lo", "success_hi", "stealth_fp"]
COLS += ["utility_cost", "attacked_q_ref_ppl", "original_q_ref_ppl", "note"]


def is_matrix(root: Path, jobs: list) -> bool:
    """A sweep made by experiment=matrix (its plan file, or its `matrix` config key)."""
    return (root / "matrix_plan.json").is_file() or any("matrix" in j.config for j in jobs)


def _name(cfg: dict, group: str) -> str:
    default = "none" if group == "prune" else "?"  # runs made before the prune group
    return str((cfg.get(group) or {}).get("name", default))


def _ratio(a: Any, b: Any) -> float | None:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b and math.isfinite(b)
    return float(a) / float(b) if ok else None


def cell(job: Any) -> dict:
    """One matrix row from a job."""
    cfg = job.config
    groups = ("model", "attack", "defense", "prune", "quantizer")
    row: dict[str, Any] = {g: _name(cfg, g) for g in groups}
    row["status"] = job.status
    if job.status != "complete":
        row["note"] = job.error
        return row
    cond = job.conditions
    attack = cfg.get("attack") or {}
    oq, aq = cond.get("original_q", {}), cond.get("attacked_q", {})
    if str(attack.get("_target_", "")).endswith("Encrypt"):
        row["goal"] = "collapse"
        r = _ratio(oq.get("ref_ppl"), aq.get("ref_ppl"))
        row["success"] = None if r is None else min(1.0, max(0.0, 1.0 - r))
    else:
        rate = RATE.get(str(attack.get("scenario")), "injection_rate")
        row["goal"] = rate
        row["success"] = aq.get(rate)
        ci = ((job.results or {}).get("intervals") or {}).get("attacked_q", {}).get(rate) or {}
        if row["success"] is not None and ci.get("lo") is not None:
            row["success_lo"], row["success_hi"] = ci["lo"], ci["hi"]
        row["stealth_fp"] = cond.get("attacked", {}).get(rate)
    row["utility_cost"] = _ratio(oq.get("ref_ppl"), cond.get("original", {}).get("ref_ppl"))
    row["attacked_q_ref_ppl"] = aq.get("ref_ppl")
    row["original_q_ref_ppl"] = oq.get("ref_ppl")
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "\\|")


def _success_md(row: dict) -> str:
    """The success cell of matrix.md: `0.85 [0.64, 0.95]` with its interval."""
    text = _fmt(row.get("success"))
    if row.get("success_lo") is not None:
        text += f" [{row['success_lo']:.3g}, {row['success_hi']:.3g}]"
    return text


def heatmap(rows: list[dict], model: str, prune: str, quantizer: str, path: Path) -> Path:
    """Success and utility cost, attacks × defenses, for one model, prune setting and
    quantizer."""
    from matplotlib.colors import LogNorm, Normalize

    key = (model, prune, quantizer)
    sub = [r for r in rows if (r["model"], r["prune"], r["quantizer"]) == key]
    attacks = sorted({r["attack"] for r in sub})
    defenses = sorted({r["defense"] for r in sub}, key=lambda d: (d != "none", d))
    fig, _ = new_figure((2.6 + 1.6 * len(defenses) * 2, 1.9 + 0.75 * len(attacks)))
    fig.clear()
    axes = fig.subplots(1, 2)
    for ax, key, title, cmap, bar in (
        (axes[0], "success", "attack success (attacked_q)", "Reds", "success (0-1)"),
        (
            axes[1],
            "utility_cost",
            "utility cost: ref_ppl original_q / original",
            "Blues",
            "ref_ppl ratio (1 = free)",
        ),
    ):
        grid = np.full((len(attacks), len(defenses)), np.nan)
        text = [["n/a"] * len(defenses) for _ in attacks]
        for r in sub:
            i, j = attacks.index(r["attack"]), defenses.index(r["defense"])
            v = r.get(key)
            if r["status"] == "complete" and isinstance(v, (int, float)):
                grid[i, j] = v
                text[i][j] = f"{v:.2f}" if key == "success" else f"{v:.3g}"
                if r.get(f"{key}_lo") is not None:
                    text[i][j] += f"\n[{r[f'{key}_lo']:.2f}, {r[f'{key}_hi']:.2f}]"
            elif r["status"] == "complete":
                text[i][j] = "–"
        finite = grid[np.isfinite(grid)]
        hi = 1.0 if key == "success" else max(2.0, float(finite.max()) if finite.size else 2.0)
        lo = 0.0 if key == "success" else 1.0
        # a cost spanning two decades on a log colour scale (1 = free stays the light end)
        log = key != "success" and hi >= 100
        norm = LogNorm(vmin=lo, vmax=hi) if log else Normalize(vmin=lo, vmax=hi)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        im.cmap.set_bad("#d9d9d9")
        for i in range(len(attacks)):
            for j in range(len(defenses)):
                dark = np.isfinite(grid[i, j]) and float(norm(max(grid[i, j], lo))) > 0.6
                color = "white" if dark else "black"  # readable on the dark end of the map
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
        ax.set_xlabel("defense")
        ax.set_ylabel("attack")
        ax.set_title(title, fontsize=9)
        label = f"{bar}, log scale" if log else bar
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(label, fontsize=8)
    note = "; [ ]: 95% Wilson interval" if any(r.get("success_lo") is not None for r in sub) else ""
    pruned = f", prune={prune}" if prune != "none" else ""
    fig.suptitle(f"{model}{pruned}, quantizer={quantizer}{note}", fontsize=10)
    return save_png(fig, path)


def write(root: Path, jobs: list, plots: bool) -> tuple[list[dict], list[Path], str]:
    """matrix.csv, matrix.md and the heatmaps; returns the rows, the plots, the Markdown."""

    rows = [cell(j) for j in jobs]
    order = ("model", "prune", "quantizer", "attack", "defense")
    rows.sort(key=lambda r: tuple(str(r[k]) for k in order))
    write_csv(root / "matrix.csv", rows, COLS)
    md = ["# Attack × defense × quantizer matrix", ""]
    md.append(
        "success: behaviour attacks' rate on attacked_q (stealth_fp: the same rate in full "
        "precision); encrypt: 1 − ref_ppl(original_q)/ref_ppl(attacked_q). utility_cost: "
        "ref_ppl(original_q)/ref_ppl(original). Brackets: 95% Wilson interval of a rate."
    )
    cols = [c for c in COLS if c not in ("success_lo", "success_hi")]
    md += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += [
        "| " + " | ".join(_success_md(r) if c == "success" else _fmt(r.get(c)) for c in cols) + " |"
        for r in rows
    ]
    text = "\n".join(md) + "\n"
    atomic_write_text(root / "matrix.md", text)
    out: list[Path] = []
    if plots:
        (root / "report_plots").mkdir(exist_ok=True)
        for m, p, q in sorted({(r["model"], r["prune"], r["quantizer"]) for r in rows}):
            name = f"matrix_{m}_{q}.png" if p == "none" else f"matrix_{m}_{p}_{q}.png"
            out.append(heatmap(rows, m, p, q, root / "report_plots" / name))
    return rows, out, text
