"""Each metric against each swept parameter, one line (or bar group) per condition, with the
95% intervals as error bars; and the noise defense's codes-changed curves (library vs theory).

- `<metric>_vs_<param>.png`: a numeric parameter gives lines (log x over two decades), a
  non-numeric one grouped bars; a metric spanning two decades gets a log y axis. Error bars:
  the row's `m_lo`/`m_hi` (results.json `intervals`: Wilson for rates, bootstrap for means and
  perplexities; over seeds, the t interval of the mean). A non-finite value (an overflowing
  perplexity) cannot be drawn: it is marked `∞` at the top of the axes. Series that are the
  same numbers (e.g. `original_q` in a sweep over an attack option, which the cache computes
  once) are drawn once, their labels joined.
- `fraction_changed_vs_<param>.png`: when the jobs' `defense_stats` carry `fraction_changed`
  and `theory_uniform` (defense=noise; experiment=noise_grid) and the parameter is numeric: the
  fraction of codes the real library changed (Wilson interval over the measured weights, which
  treats them as independent) and the closed form for weights uniform in their intervals.
- `noise_scurve.png`: every job's `noise_scurve*.json` (defense=noise with diagnostics): the
  same two measures over the S-curve's σ grid (and σ̂), one colour per job and branch, and
  below, each one's difference from the theory in percentage points (the interval route too).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from qexp.core.plots import error_bars, new_figure, save_png
from qexp.tools.report.sweep import numeric
from qexp.tools.report.tables import LABELS, param_col

# y-axis titles: what the metric is, then its results.json key
DESCRIPTIONS = {
    "accuracy": "accuracy",
    "cos_sim": "cosine similarity to original's outputs",
    "ref_ppl": "reference perplexity",
    "self_ppl": "self-perplexity of the outputs",
    "bertscore_f1": "BERTScore F1 to original's outputs",
    "max_repeat_3": "max repeats of a 3-gram",
    "seq_rep_4": "repeated 4-gram fraction",
    "injection_rate": "content-injection rate",
    "refusal_rate": "refusal rate",
}


def axis_label(m: str) -> str:
    """A metric's axis title: `reference perplexity (ref_ppl)`."""
    return f"{DESCRIPTIONS.get(m, LABELS.get(m, m))} ({m})"


def log_scale(values: list[float | None]) -> bool:
    """A log axis: all values positive and spanning at least two decades."""
    vals = [v for v in values if v is not None]
    pos = [v for v in vals if v > 0 and math.isfinite(v)]
    return bool(pos) and len(pos) == len(vals) and max(pos) / min(pos) >= 100


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def interval_note(rows: list[dict], m: str) -> str:
    """What the error bars of metric `m` are (empty: none drawn)."""
    if not any(r.get(f"{m}_lo") is not None for r in rows):
        return "no interval recorded"
    if any(r.get(f"{m}_sd") is not None for r in rows):
        n = sorted({r[f"{m}_n"] for r in rows if r.get(f"{m}_n") is not None})
        seeds = "/".join(str(k) for k in n)
        return f"mean over {seeds} seeds; error bars: 95% t interval of the mean"
    return "error bars: 95% intervals (Wilson: rates; bootstrap: means, perplexities)"


def _series(rows: list[dict], pc: str, m: str, others: list[str]) -> dict[str, list[dict]]:
    """One series per (condition, other swept values); identical series merged, labels joined."""
    raw: dict[tuple, list[dict]] = {}
    for r in rows:
        raw.setdefault((r["condition"], *(str(r[q]) for q in others)), []).append(r)
    merged: dict[tuple, list[tuple]] = {}  # (condition, points) -> keys
    for key, rs in raw.items():
        pts = tuple(sorted((str(r[pc]), repr(r[m]), repr(r.get(f"{m}_lo"))) for r in rs))
        merged.setdefault((key[0], pts), []).append(key)
    out: dict[str, list[dict]] = {}
    for keys in merged.values():
        label = keys[0][0]
        for i, q in enumerate(others, start=1):
            values = list(dict.fromkeys(k[i] for k in keys))
            label += f", {q}={'/'.join(values)}"
        out[label] = raw[keys[0]]
    return out


def _darker(color: str, f: float = 0.6) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return (r * f, g * f, b * f)


def _mark_infinite(ax: Any, xs: list[float], color: str | None = None) -> None:
    """`∞` at the top of the axes above each x whose value could not be drawn."""
    for x in xs:
        ax.annotate(
            "∞",
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, -2),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=15,
            fontweight="bold",
            color=color or "black",
        )


def metric_plot(
    rows: list[dict], p: str, m: str, others: list[str], xs: dict[Any, float | None], path: Path
) -> Path:
    """One metric against one swept parameter (lines or grouped bars) with error bars."""
    pc = param_col(p)
    is_num = all(v is not None for v in xs.values())
    pts = [r for r in rows if isinstance(r.get(m), (int, float)) and r[m] is not None]
    series = _series(pts, pc, m, others)
    fig, ax = new_figure((7.5, 4.4))
    infinite = False
    if is_num:
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: xs[r[pc]])
            ok = [r for r in rs if _finite(r[m])]
            line = ax.errorbar(
                [xs[r[pc]] for r in ok],
                [r[m] for r in ok],
                yerr=error_bars(ok, m),
                marker="o",
                capsize=3,
                label=label,
            )
            bad = [xs[r[pc]] for r in rs if not _finite(r[m])]
            infinite |= bool(bad)
            _mark_infinite(ax, bad, line.lines[0].get_color())
        if log_scale(list(xs.values())):
            ax.set_xscale("log")
    else:
        cats = list(dict.fromkeys(r[pc] for r in rows))
        width = 0.8 / max(1, len(series))
        for i, (label, rs) in enumerate(series.items()):
            by = {r[pc]: r for r in rs}
            pos = [k for k, c in enumerate(cats) if c in by and _finite(by[c][m])]
            ok = [by[cats[k]] for k in pos]
            color = f"C{i % 10}"
            ax.bar(
                [k - 0.4 + width * (i + 0.5) for k in pos],
                [r[m] for r in ok],
                width=width,
                color=color,
                yerr=error_bars(ok, m),
                capsize=2,
                # a darker shade of the bar's colour: a zero-height bar's interval says whose
                error_kw={"elinewidth": 1, "ecolor": _darker(color)},
                label=label,
            )
            bad = [k for k, c in enumerate(cats) if c in by and not _finite(by[c][m])]
            infinite |= bool(bad)
            _mark_infinite(ax, [k - 0.4 + width * (i + 0.5) for k in bad], color)
        ax.set_xticks(range(len(cats)), [str(c) for c in cats], rotation=30 if len(cats) > 4 else 0)
    if log_scale([r[m] for r in pts if _finite(r[m])]):
        ax.set_yscale("log")
    ax.set_xlabel(p)
    ax.set_ylabel(axis_label(m))
    note = interval_note(pts, m) + ("; ∞: not finite" if infinite else "")
    ax.set_title(f"{DESCRIPTIONS.get(m, LABELS.get(m, m))} vs {p}\n{note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _job_dirs(root: Path, rows: list[dict]) -> dict[str, Path]:
    """The job directories behind the rows (rows aggregated over seeds have none)."""
    out = {}
    for r in rows:
        d = root / str(r.get("job", ""))
        if r.get("job") and (d / "results.json").is_file():
            out[r["job"]] = d
    return out


def _wilson(fractions: list[float], ns: list[int]) -> list[list[float]]:
    from qexp.core.stats import wilson

    lo, hi = [], []
    for f, n in zip(fractions, ns):
        ci = wilson(round(f * n), n)
        lo.append(max(0.0, f - ci["lo"]))
        hi.append(max(0.0, ci["hi"] - f))
    return [lo, hi]


def _codes_axes(ax: Any, title: str) -> None:
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("noise σ (defense.sigma)")
    ax.set_ylabel("fraction of non-pinned codes changed")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def scurve_plot(curves: list[tuple[str, dict]], path: Path) -> Path:
    """The noise S-curves of several jobs: library (Wilson error bars) and theory above, their
    difference (library − theory, in percentage points) below."""
    fig, _ = new_figure((7.5, 5.6))
    fig.clear()
    ax, diff = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for label, c in curves:
        named = [q for k, q in (c.get("points") or {}).items() if k != "per_layer"]  # σ̂, fixed
        pts = [q for q in c["grid"] + named if _finite(q.get("sigma"))]
        pts = sorted(
            (q for q in pts if _finite(q.get("fraction_changed"))), key=lambda q: q["sigma"]
        )
        sig = [q["sigma"] for q in pts]
        frac = [q["fraction_changed"] for q in pts]
        ns = [int(q["n_weights_measured"]) for q in pts]
        yerr = _wilson(frac, ns)
        line = ax.errorbar(sig, frac, yerr=yerr, marker="o", capsize=3, label=f"{label}: library")
        color = line.lines[0].get_color()
        theory = [q.get("theory_uniform") for q in pts]
        ax.plot(sig, theory, "--", color=color, linewidth=1.2, label=f"{label}: theory")
        gap = [(f - t) * 100 for f, t in zip(frac, theory)]
        pp = [[e * 100 for e in side] for side in yerr]
        diff.errorbar(sig, gap, yerr=pp, marker=".", capsize=3, color=color, label="library")
        ivl = [q.get("fraction_changed_intervals") for q in pts]
        if all(_finite(v) for v in ivl):  # the weights that left their own clean interval
            route = [(v - t) * 100 for v, t in zip(ivl, theory)]
            diff.plot(sig, route, "x:", color=color, linewidth=1, label="interval route")
        if c.get("sigma_hat"):
            for a in (ax, diff):
                a.axvline(c["sigma_hat"], color=color, linewidth=0.8, linestyle=":")
    n = min(int(p["n_weights_measured"]) for _, c in curves for p in c["grid"])
    _codes_axes(
        ax,
        "Codes changed by N(0, σ²) noise: library vs uniform-position theory\n"
        f"error bars: 95% Wilson over ≥ {n:,} sampled weights; dotted: σ̂",
    )
    ax.set_xlabel("")
    diff.axhline(0, color="gray", linewidth=0.8)
    diff.set_ylabel("minus theory\n(percentage points)", fontsize=9)
    diff.set_xlabel("noise σ (defense.sigma)")
    diff.grid(alpha=0.3)
    diff.legend(fontsize=7, loc="upper left")
    return save_png(fig, path)


def _curve_label(job: str, swept: dict[str, Any], curve: dict, stem: str) -> str:
    """The S-curve's quantizer, the job's other swept values and a branch other than original."""
    parts = [str(curve.get("quantizer") or job)]
    parts += [f"{k}={v}" for k, v in swept.items() if v is not None and k != "quantizer"]
    branch = stem.removeprefix("noise_scurve").lstrip("_")
    return ", ".join(parts) + (f" ({branch})" if branch else "")


def defense_plots(root: Path, rows: list[dict], params: list[str]) -> list[Path]:
    """fraction_changed_vs_<param>.png and noise_scurve.png from the jobs' own files."""
    out_dir, files = root / "report_plots", []
    dirs = _job_dirs(root, rows)
    first = {r["job"]: r for r in reversed(rows) if r.get("job") in dirs}
    curves = []
    for job, d in dirs.items():
        swept = {p: first[job].get(param_col(p)) for p in params}
        for f in sorted(d.glob("noise_scurve*.json")):
            try:
                curve = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if curve.get("grid") and all("n_weights_measured" in p for p in curve["grid"]):
                curves.append((_curve_label(job, swept, curve, f.stem), curve))
    if curves:
        files.append(scurve_plot(curves, out_dir / "noise_scurve.png"))

    stats: dict[str, dict[str, dict]] = {}  # branch -> job -> defense stats
    for job, d in dirs.items():
        try:
            body = json.loads((d / "results.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for branch, s in (body.get("defense_stats") or {}).items():
            keys = ("fraction_changed", "theory_uniform", "n_weights_measured")
            if isinstance(s, dict) and all(_finite(s.get(k)) for k in keys):
                stats.setdefault(branch, {})[job] = s
    for p in params:
        pc = param_col(p)
        xs = {job: numeric(first[job].get(pc)) for job in dirs}
        if not stats or any(v is None for v in xs.values()):
            continue
        others = [q for q in params if q != p]
        fig, ax = new_figure((7.5, 4.6))
        for branch, by_job in stats.items():
            groups: dict[tuple, list[str]] = {}
            for job in by_job:
                groups.setdefault(tuple(str(first[job].get(param_col(q))) for q in others), [])
                groups[tuple(str(first[job].get(param_col(q))) for q in others)].append(job)
            for key, jobs in groups.items():
                jobs.sort(key=lambda j: xs[j])
                label = branch + "".join(f", {q}={v}" for q, v in zip(others, key))
                x = [xs[j] for j in jobs]
                frac = [by_job[j]["fraction_changed"] for j in jobs]
                ns = [int(by_job[j]["n_weights_measured"]) for j in jobs]
                line = ax.errorbar(
                    x,
                    frac,
                    yerr=_wilson(frac, ns),
                    marker="o",
                    capsize=3,
                    label=f"{label}: library",
                )
                theory = [by_job[j]["theory_uniform"] for j in jobs]
                color = line.lines[0].get_color()
                ax.plot(x, theory, "--", color=color, linewidth=1.2, label=f"{label}: theory")
        _codes_axes(
            ax,
            f"Codes changed by the defense vs {p}: library vs uniform-position theory\n"
            "error bars: 95% Wilson over the measured weights",
        )
        ax.set_xlabel(p)
        if not log_scale(list(xs.values())):
            ax.set_xscale("linear")
        files.append(save_png(fig, out_dir / f"fraction_changed_vs_{_safe(p)}.png"))
    return files


def make_plots(
    root: Path, rows: list[dict], params: list[str], metrics: list[str]
) -> tuple[list[Path], list[str]]:
    """PNGs of every metric against every swept parameter, and the defense's codes-changed
    curves when the jobs recorded them; returns (files, notes)."""
    if not rows:
        return [], []
    files = defense_plots(root, rows, params)
    if not params:
        return files, ([] if files else ["no swept parameter: no plots"])
    out_dir, notes = root / "report_plots", []
    for p in params:
        pc = param_col(p)
        others = [param_col(q) for q in params if q != p]
        xs = {r[pc]: numeric(r[pc]) for r in rows}
        for m in metrics:
            if not any(isinstance(r.get(m), (int, float)) for r in rows):
                continue
            path = out_dir / f"{_safe(m)}_vs_{_safe(p)}.png"
            files.append(metric_plot(rows, p, m, others, xs, path))
        if not all(v is not None for v in xs.values()):
            notes.append(f"{p} is not numeric: grouped bar charts")
    return files, notes
