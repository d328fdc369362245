"""Human summary and plots of an audit report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"layers\.(\d+)\.")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _flagged_tensors(names: list[str], shown: int = 8) -> list[str]:
    """Summary lines naming the first flagged tensors and counting the rest."""
    lines = [f"    {name}" for name in names[:shown]]
    if len(names) > shown:
        lines.append(f"    ... {len(names) - shown} more tensors")
    return lines


def summary(report: dict[str, Any]) -> str:
    """A few lines per check: verdict, score, the most suspicious items."""
    lines = [f"qexp.audit {report['checkpoint']}", f"verdict: {report['verdict'].upper()}"]
    checks = report["checks"]
    if "reparam" in checks:
        r = checks["reparam"]
        lines.append(
            f"[reparam] {r['verdict']}: {r['score']['n_flagged']} flagged heads/layers, "
            f"max robust z {_fmt(r['score']['max_abs_z'])}"
        )
        for k, f in r["features"].items():
            lines.append(
                f"    {k:10s} median {f['median']:.3g}  max {f['max']:.3g}  "
                f"max z {_fmt(f['max_z'])}  flagged {f['n_flagged']}/{f['n']}"
            )
        for h in r["flagged_heads"][:8]:
            lines.append(
                f"    layer {h['layer']} kv-head {h['kv_head']}: {', '.join(h['features'])}"
            )
        if len(r["flagged_heads"]) > 8:
            lines.append(f"    ... {len(r['flagged_heads']) - 8} more heads")
        if r["flagged_mlp_layers"]:
            lines.append(f"    MLP spread flagged in layers {r['flagged_mlp_layers']}")
    if "gap" in checks:
        g = checks["gap"]
        s = g["score"]
        lines.append(
            f"[gap] {g['verdict']}: max spike {s['max_spike']:.3g} ({s['at']}), "
            f"p {s['p']:.3g}, flagged {s['n_flagged']}/{s['n_tests']} (tensor, target) pairs"
        )
        for name, t in g["per_target"].items():
            lines.append(
                f"    {name:10s} max spike {t['max_spike']:.3g} at u={_fmt(t['spike_u'])} "
                f"({t['at']}), min p {t['min_p']:.3g}, flagged {t['n_flagged']}/{t['n_tensors']}"
            )
        if g["skipped"]:
            lines.append(f"    skipped {len(g['skipped'])} pairs (grid does not fit), see JSON")
    if "outlier" in checks:
        o = checks["outlier"]
        s = o["score"]
        lines.append(
            f"[outlier] {o['verdict']}: {s['n_flagged']}/{s['n_tensors']} tensors flagged, "
            f"max fraction of blocks with max/second |w| >= {o['limit']['ratio']:g}: "
            f"{s['max_outlier_fraction']:.3g}, max ratio {s['max_ratio']:.3g}"
        )
        lines += _flagged_tensors(o["flagged"])
    if "prune" in checks:
        p = checks["prune"]
        s = p["score"]
        at = ", ".join(f"{x:g}" for x in s["sparsity"]) or "-"
        lines.append(
            f"[prune] {p['verdict']}: {s['n_flagged']}/{s['n_tensors']} tensors flagged, |w| "
            f"density below/above a magnitude cut up to {s['max_ratio']:.3g} (flagged at "
            f"sparsity {at})"
        )
        lines += _flagged_tensors(p["flagged"])
    if "finite" in checks:
        f = checks["finite"]
        read = ", ".join(f"{k}: {v}" for k, v in f["read_as"].items())
        lines.append(
            f"[finite] {f['verdict']}: {len(f['nonfinite'])}/{f['tensors']} tensors hold NaN or "
            f"infinite values (read {read})"
        )
        for name, n in list(f["nonfinite"].items())[:8]:
            lines.append(f"    {name}: {n} non-finite values")
        if f["not_interpreted"]:
            lines.append(
                f"    not interpreted (skipped by every check): {f['not_interpreted'][:5]}"
                + (" ..." if len(f["not_interpreted"]) > 5 else "")
            )
    if "reference" in checks:
        d = checks["reference"]
        s = d["score"]
        lines.append(
            f"[reference] {d['verdict']}: {s['n_changed']}/{s['n_compared']} tensors differ, "
            f"max rel. Frobenius {s['max_rel_frobenius']:.3g}"
        )
        if d["changed_by_layer"]:
            lines.append(f"    by layer: {d['changed_by_layer']}")
            lines.append(f"    by module: {d['changed_by_module']}")
        for k in ("only_in_checkpoint", "only_in_reference", "shape_mismatch"):
            if d[k]:
                lines.append(f"    {k}: {d[k][:5]}{' ...' if len(d[k]) > 5 else ''}")
    if "differential" in checks:
        d = checks["differential"]
        lines.append(f"[differential] {d['verdict']}")
        for name, t in d["per_target"].items():
            if "skipped" in t:
                lines.append(f"    {name:10s} skipped: {t['skipped']}")
                continue
            lines.append(
                f"    {name:10s} KL {t['kl']:.3g} (dithered twin {t['kl_dithered']:.3g}, "
                f"ratio {t['ratio']:.3g})  top-1 agreement {t['top1_agreement']:.3f}  "
                f"flagged above KL {t['kl_limit']:.3g}"
            )
    lines.append(f"exit code {report['exit_code']}")
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], out: Path) -> list[str]:
    """PNG plots next to the report; returns their file names."""
    from matplotlib.figure import Figure

    from qexp.core.plots import new_figure, save_png

    made = []
    checks = report["checks"]
    if "reparam" in checks:
        r = checks["reparam"]
        fig = Figure(figsize=(8, 9), dpi=100)
        axes = fig.subplots(4, 1, sharex=True)
        for ax, key in zip(axes[:3], ("vo_cond", "vo_scale", "qk_scale")):
            xs = [
                h["layer"] + h["kv_head"] / (1 + max(x["kv_head"] for x in r["heads"]))
                for h in r["heads"]
            ]
            ys = [h[key] for h in r["heads"]]
            col = ["C3" if h[f"{key}_flag"] else "C0" for h in r["heads"]]
            ax.scatter(xs, ys, c=col, s=10)
            ax.axhline(r["features"][key]["median"], color="grey", lw=0.5)
            ax.set_ylabel(key)
        axes[3].bar(
            [x["layer"] for x in r["layers"]],
            [x["mlp_spread"] for x in r["layers"]],
            color=["C3" if x["mlp_spread_flag"] else "C0" for x in r["layers"]],
        )
        axes[3].set_ylabel("mlp_spread")
        axes[3].set_xlabel("layer (red: flagged)")
        fig.suptitle("reparameterization features per kv-head / layer")
        save_png(fig, out / "reparam_layers.png")
        made.append("reparam_layers.png")
    if "gap" in checks and checks["gap"]["tensors"]:
        g = checks["gap"]
        fig, ax = new_figure((8, 4), dpi=100)
        for t in sorted({r["target"] for r in g["tensors"]}):
            per: dict[int, float] = {}
            for r in g["tensors"]:
                m = _LAYER.search(r["tensor"])
                if r["target"] == t and m:
                    li = int(m.group(1))
                    per[li] = max(per.get(li, 0.0), r["spike"])
            ax.plot(sorted(per), [per[k] for k in sorted(per)], marker=".", label=t)
        ax.axhline(g["thresholds"]["spike_min"], color="C3", ls="--", lw=0.8, label="threshold")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("max spike score S")
        ax.legend(fontsize=7)
        save_png(fig, out / "gap_layers.png")
        made.append("gap_layers.png")
        key, counts = next(iter(g["histograms"].items()))
        bins = len(counts) - 1
        fig, ax = new_figure((8, 4), dpi=100)
        ax.bar([k / bins for k in range(bins + 1)], counts, width=1 / bins)
        ax.set_xlabel("u = (w - lo) / (hi - lo)")
        ax.set_ylabel("weights")
        ax.set_title(f"most spiked: {key}", fontsize=8)
        save_png(fig, out / "gap_hist.png")
        made.append("gap_hist.png")
    return made
