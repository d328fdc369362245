"""The figures of `qexp-report` (docs/figures.md): error bars from the 95% intervals, axis
titles, non-finite values, the noise S-curve (library vs theory) and the matrix heatmap.
No model: every sweep is written by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from matplotlib.container import BarContainer, ErrorbarContainer

from qexp.core.plots import error_bars
from qexp.tools.report import main
from qexp.tools.report import matrix as report_matrix
from qexp.tools.report import plots as report_plots
from qexp.tools.report.jobs import discover
from qexp.tools.report.plots import axis_label
from qexp.tools.report.sweep import swept_params
from qexp.tools.report.tables import seed_rows, table_rows

PNG = b"\x89PNG\r\n\x1a\n"


def write_job(root: Path, num: int, overrides: list[str], body: dict, files: dict | None = None):
    """A Hydra-style job dir: .hydra/overrides.yaml, results.json and any other JSON files."""
    d = root / f"{num}_{','.join(overrides)}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "results.json").write_text(json.dumps({"status": "complete", **body}))
    for name, content in (files or {}).items():
        (d / name).write_text(json.dumps(content))
    return d


def ci(lo: float, hi: float, method: str = "bootstrap") -> dict:
    return {"lo": lo, "hi": hi, "method": method, "n": 20}


def encrypt_sweep(root: Path) -> Path:
    """attack.preset x quantizer, ref_ppl with intervals; one attacked_q overflows to inf."""
    ppl = {
        ("exact", "rtn4"): (7.1e6, 5.2e6, 9.4e6),
        ("exact", "bnb_int8"): (math.inf, None, None),
        ("paper", "rtn4"): (1022.0, 900.0, 1200.0),
        ("paper", "bnb_int8"): (37.9, 33.0, 43.0),
    }
    clean = {"rtn4": (34.78, 31.3, 39.8), "bnb_int8": (25.93, 22.9, 29.6)}
    for i, ((preset, q), (v, lo, hi)) in enumerate(ppl.items()):
        ints = {"original_q": {"ref_ppl": ci(*clean[q][1:])}}
        if lo is not None:
            ints["attacked_q"] = {"ref_ppl": ci(lo, hi)}
        write_job(
            root,
            i,
            [f"attack.preset={preset}", f"quantizer={q}"],
            {
                "config": {"quantizer": {"name": q}},
                "conditions": {
                    "original_q": {"ref_ppl": clean[q][0]},
                    "attacked_q": {"ref_ppl": v},
                },
                "intervals": ints,
            },
        )
    return root


def capture(monkeypatch, module) -> dict:
    """The figures `module` saves through save_png, by file name, kept to inspect."""
    figs, real = {}, module.save_png

    def keep(fig, path):
        figs[Path(path).name] = fig
        return real(fig, path)

    monkeypatch.setattr(module, "save_png", keep)
    return figs


def rows_of(root: Path, metrics: list[str]) -> tuple[list[dict], list[str]]:
    jobs = discover(root)
    params, _ = swept_params(jobs)
    return table_rows(jobs, params, metrics), params


def test_error_bars_from_intervals():
    rows = [
        {"m": 10.0, "m_lo": 8.0, "m_hi": 13.0},
        {"m": 5.0},  # no interval: a zero-length bar
        {"m": 2.0, "m_lo": 1.0, "m_hi": math.inf},  # not finite: none either
    ]
    assert error_bars(rows, "m") == [[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]
    assert error_bars([{"m": 1.0}], "m") is None


def test_report_draws_error_bars_axis_titles_and_marks_infinity(tmp_path: Path, monkeypatch):
    root = encrypt_sweep(tmp_path / "enc")
    figs = capture(monkeypatch, report_plots)
    assert main([str(root)]) == 0
    names = ["ref_ppl_vs_attack.preset.png", "ref_ppl_vs_quantizer.png"]
    assert sorted(figs) == names
    for name in names:
        assert (root / "report_plots" / name).read_bytes().startswith(PNG)
    # grouped bars with yerr, log y, axis titles
    (ax,) = figs["ref_ppl_vs_quantizer.png"].axes
    assert ax.get_xlabel() == "quantizer"
    assert ax.get_ylabel() == axis_label("ref_ppl") == "reference perplexity (ref_ppl)"
    assert ax.get_yscale() == "log"
    assert "95% interval" in ax.get_title() and "∞" in ax.get_title()
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    # original_q is the same numbers under both presets: drawn once, labels joined
    labels = sorted(c.get_label() for c in bars)
    assert labels == [
        "attacked_q, attack.preset=exact",
        "attacked_q, attack.preset=paper",
        "original_q, attack.preset=exact/paper",
    ]
    assert all(c.errorbar is not None for c in bars)
    exact = next(c for c in bars if c.get_label() == "attacked_q, attack.preset=exact")
    assert len(exact.patches) == 1  # bnb_int8's inf is not a bar ...
    assert [t.get_text() for t in ax.texts] == ["∞"]  # ... but a mark at the top
    segs = exact.errorbar.lines[2][0].get_segments()
    assert [tuple(s[:, 1]) for s in segs] == [pytest.approx((5.2e6, 9.4e6))]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(labels) <= set(legend)


def test_numeric_sweep_gives_errorbar_lines_and_seed_means(tmp_path: Path, monkeypatch):
    root = tmp_path / "kappa"
    for i, (k, seed) in enumerate((k, s) for k in (2, 8, 64) for s in (0, 1)):
        v = 30.0 * k + seed
        write_job(
            root,
            i,
            [f"attack.kappa=[{k},{k}]", f"seed={seed}"],
            {
                "config": {"quantizer": {"name": "rtn4"}},
                "conditions": {"attacked_q": {"ref_ppl": v, "accuracy": 0.5}},
                "intervals": {
                    "attacked_q": {
                        "ref_ppl": ci(v - 5, v + 5),
                        "accuracy": ci(0.3, 0.7, "wilson"),
                    }
                },
            },
        )
    figs = capture(monkeypatch, report_plots)
    assert main([str(root), "--metrics", "ref_ppl"]) == 0
    assert sorted(figs) == ["ref_ppl_vs_attack.kappa.png"]  # seeds are averaged, not a sweep
    assert (root / "report_plots" / "ref_ppl_vs_attack.kappa.png").read_bytes().startswith(PNG)
    rows, params = rows_of(root, ["ref_ppl"])
    assert [r["ref_ppl_n"] for r in seed_rows(rows, params, ["ref_ppl"])] == [2, 2, 2]

    (ax,) = figs["ref_ppl_vs_attack.kappa.png"].axes
    (cont,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert cont.has_yerr and cont.get_label() == "attacked_q"
    assert ax.get_xscale() == "linear" and ax.get_xlabel() == "attack.kappa"
    assert "mean over 2 seeds" in ax.get_title() and "t interval" in ax.get_title()
    # the t interval over two seeds (values v, v + 1) is wider than the seeds' spread
    lo, hi = cont.lines[2][0].get_segments()[0][:, 1]
    assert lo < 60.0 < 61.0 < hi


def scurve(quantizer: str, scale: float) -> dict:
    grid = []
    for k in range(7):
        s = 10.0 ** (-6 + k * 4 / 6)
        f = 1 - math.exp(-s / (scale * 2.5e-3))
        grid.append(
            {
                "sigma": s,
                "fraction_changed": f,
                "fraction_changed_intervals": f,
                "theory_uniform": min(1.0, f * 0.98),
                "n_weights_measured": 1000,
            }
        )
    return {"method": "library", "grid": grid, "sigma_hat": 2.5e-3 * scale, "quantizer": quantizer}


def test_noise_scurve_and_fraction_changed_vs_sigma(tmp_path: Path, monkeypatch):
    # two quantizers, each job with its S-curve file (diagnostics) and defense_stats
    root = tmp_path / "noise"
    for i, (q, scale) in enumerate((("rtn4", 4.0), ("bnb_int8", 1.0))):
        write_job(
            root,
            i,
            [f"quantizer={q}"],
            {
                "config": {"quantizer": {"name": q}},
                "conditions": {"original_q": {"ref_ppl": 30.0 + i}},
                "defense_stats": {
                    "original": {
                        "fraction_changed": 0.4,
                        "theory_uniform": 0.39,
                        "n_weights_measured": 10**6,
                    }
                },
            },
            files={"noise_scurve.json": scurve(q, scale)},
        )
    figs = capture(monkeypatch, report_plots)
    assert main([str(root), "--no-plots"]) == 0
    assert not figs
    assert main([str(root), "--metrics", "ref_ppl"]) == 0
    # quantizer is not numeric: no fraction_changed_vs_quantizer
    assert sorted(figs) == ["noise_scurve.png", "ref_ppl_vs_quantizer.png"]
    assert (root / "report_plots" / "noise_scurve.png").read_bytes().startswith(PNG)
    ax, diff = figs["noise_scurve.png"].axes
    assert diff.get_xlabel() == "noise σ (defense.sigma)" and "theory" in diff.get_ylabel()
    gaps = [c for c in diff.containers if isinstance(c, ErrorbarContainer)]
    assert len(gaps) == 2 and all(c.has_yerr for c in gaps)  # library − theory, per quantizer
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ["rtn4: library", "bnb_int8: library"]
    assert all(c.has_yerr for c in bars)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "rtn4: theory" in legend and "bnb_int8: theory" in legend
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "fraction of non-pinned codes changed"

    # a σ sweep (noise_grid, diagnostics off): one point per job from defense_stats
    grid = tmp_path / "grid"
    for i, s in enumerate(("1e-5", "1e-4", "1e-3")):
        f = [0.002, 0.017, 0.166][i]
        write_job(
            grid,
            i,
            ["defense=noise", f"defense.sigma={s}"],
            {
                "config": {"quantizer": {"name": "bnb_int8"}},
                "conditions": {"original_q": {"accuracy": 0.45}},
                "intervals": {"original_q": {"accuracy": ci(0.25, 0.65, "wilson")}},
                "defense_stats": {
                    "original": {
                        "fraction_changed": f,
                        "theory_uniform": f * 0.97,
                        "n_weights_measured": 10**5,
                    }
                },
            },
        )
    figs.clear()
    assert main([str(grid)]) == 0
    plots = sorted(p.name for p in (grid / "report_plots").iterdir())
    assert plots == ["accuracy_vs_defense.sigma.png", "fraction_changed_vs_defense.sigma.png"]
    (ax,) = figs["fraction_changed_vs_defense.sigma.png"].axes
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "defense.sigma"
    (line,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert line.has_yerr and line.get_label() == "original: library"
    assert list(line.lines[0].get_ydata()) == [0.002, 0.017, 0.166]


def matrix_job(root: Path, num: int, attack: str, defense: str, rate: float | None, ppl: float):
    target = "qexp.attacks.encrypt.Encrypt" if attack.startswith("encrypt") else "x.Outlier"
    conds = {
        "original": {"ref_ppl": 25.0},
        "original_q": {"ref_ppl": 30.0},
        "attacked": {"ref_ppl": 31.0, "injection_rate": 0.0},
        "attacked_q": {"ref_ppl": ppl},
    }
    intervals = {}
    if rate is not None:
        conds["attacked_q"]["injection_rate"] = rate
        intervals = {"attacked_q": {"injection_rate": ci(rate / 2, (1 + rate) / 2, "wilson")}}
    cfg = {
        "model": {"name": "smollm2_135m"},
        "attack": {"name": attack, "_target_": target, "scenario": "content_injection"},
        "defense": {"name": defense},
        "quantizer": {"name": "rtn4"},
        "matrix": {"size": "small"},
    }
    over = [f"attack={attack}", f"defense={defense}"]
    body = {"config": cfg, "conditions": conds, "intervals": intervals}
    write_job(root, num, over, body)


def test_matrix_heatmap_has_axis_titles_and_intervals(tmp_path: Path, monkeypatch):
    root = tmp_path / "m"
    matrix_job(root, 0, "encrypt_exact", "none", None, 7e6)
    matrix_job(root, 1, "encrypt_exact", "clip", None, 40.0)
    matrix_job(root, 2, "outlier", "none", 0.85, 36.0)
    matrix_job(root, 3, "outlier", "clip", 0.05, 33.0)
    figs = capture(monkeypatch, report_matrix)
    assert main([str(root), "--metrics", "injection_rate"]) == 0
    assert (root / "report_plots" / "matrix_smollm2_135m_rtn4.png").read_bytes().startswith(PNG)
    md = (root / "matrix.md").read_text()
    assert "0.85 [0.425, 0.925]" in md  # the success rate with its Wilson interval
    header = (root / "matrix.csv").read_text().splitlines()[0].split(",")
    assert {"success_lo", "success_hi"} <= set(header)

    fig = figs["matrix_smollm2_135m_rtn4.png"]
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 2
    for ax in images:
        assert ax.get_xlabel() == "defense" and ax.get_ylabel() == "attack"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "clip"]
    cbars = [ax for ax in fig.axes if not ax.images]
    assert all(ax.get_ylabel() for ax in cbars)  # colour bars say what they measure
    texts = [t.get_text() for t in images[0].texts]
    assert "0.85\n[0.42, 0.93]" in texts
