"""`python -m qexp.tools.report`: tables, plots, incomplete jobs and validation selection."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qexp.tools.report import main
from qexp.tools.report.plots import log_scale
from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def job(
    root: Path,
    num: int,
    overrides: list[str] | None,
    conditions: dict,
    *,
    status: str = "complete",
    error: str | None = None,
    quantizer: str = "rtn4",
    benchmark: dict | None = None,
    items: dict[str, list[str]] | None = None,
    results: bool = True,
) -> Path:
    """A Hydra-style job dir written by hand: results.json, .hydra/overrides.yaml."""
    d = root / f"{num}_{','.join(overrides or ['job'])}"
    if overrides is not None:
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    d.mkdir(parents=True, exist_ok=True)
    if results:
        body = {
            "config": {
                "quantizer": {"name": quantizer, "bits": int(quantizer[-1])},
                "benchmark": benchmark or {"name": "svamp", "source": "embedded", "limit": 4},
            },
            "conditions": conditions,
            "status": status,
        }
        if error:
            body["error"] = error
        (d / "results.json").write_text(json.dumps(body))
    for cond, ids in (items or {}).items():
        (d / "generations").mkdir(exist_ok=True)
        (d / "generations" / f"{cond}.jsonl").write_text(
            "".join(json.dumps({"id": i, "output": "x"}) + "\n" for i in ids)
        )
    return d


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


SIGMAS = ("1e-5", "1e-4", "1e-3")


@pytest.fixture
def sigma_sweep(tmp_path: Path) -> Path:
    """A noise_grid-like sweep: defense.sigma over 3 decades, two conditions."""
    root = tmp_path / "sweep"
    for i, s in enumerate(SIGMAS):
        job(
            root,
            i,
            ["defense=noise", f"defense.sigma={s}", "logger=none"],
            {
                "original": {"accuracy": 0.5, "ref_ppl": 20.123456, "n_items": 4},
                "original_q": {
                    "accuracy": [0.5, 0.25, 0.0][i],
                    "ref_ppl": [21.0, 34.6474609375, 1234.5678][i],
                    "cos_sim": [0.9, 0.8, 0.123456789][i],
                },
            },
        )
    return root


def test_tables_csv_markdown_and_plots(sigma_sweep: Path, capsys):
    assert main([str(sigma_sweep)]) == 0
    out = capsys.readouterr().out

    rows = read_csv(sigma_sweep / "report.csv")
    assert list(rows[0]) == [
        "job",
        "defense.sigma",
        "condition",
        "quantizer",
        "accuracy",
        "cos_sim",
        "ref_ppl",
    ]  # only metrics with a value, in the paper's order; n_items is not a table metric
    assert [(r["defense.sigma"], r["condition"], r["quantizer"]) for r in rows] == [
        (s, c, q) for s in SIGMAS for c, q in (("original", "none"), ("original_q", "rtn4"))
    ]
    assert rows[3]["job"] == "1_defense=noise,defense.sigma=1e-4,logger=none"
    assert float(rows[3]["ref_ppl"]) == 34.6474609375  # full precision in the CSV
    assert float(rows[5]["cos_sim"]) == 0.123456789
    assert rows[0]["cos_sim"] == ""  # absent, not 0

    md = (sigma_sweep / "report.md").read_text()
    assert "| defense.sigma | condition | quantizer | Accuracy | CosSim | PPL |" in md
    assert "| 1e-4 | original_q | rtn4 | 0.25 | 0.8 | 34.65 |" in md
    assert "| 1e-3 | original_q | rtn4 | 0 | 0.1235 | 1235 |" in md
    assert "| 1e-5 | original | none | 0.5 | - | 20.12 |" in md
    assert "Swept (from overrides): `defense.sigma`" in md
    assert "Fixed overrides: `defense=noise` `logger=none`" in md
    assert "did not complete" not in md
    assert md in out  # printed as well

    plots = sorted(p.name for p in (sigma_sweep / "report_plots").iterdir())
    assert plots == [
        "accuracy_vs_defense.sigma.png",
        "cos_sim_vs_defense.sigma.png",
        "ref_ppl_vs_defense.sigma.png",
    ]
    assert all((sigma_sweep / "report_plots" / p).read_bytes().startswith(PNG) for p in plots)


def test_log_axis_from_two_decades():
    assert log_scale([1e-5, 5e-5, 1e-4, 5e-4, 1e-3])  # noise_grid's sigmas
    assert not log_scale([2, 8, 64])
    assert not log_scale([0.0, 1e-3, 1.0])  # a zero cannot go on a log axis
    assert log_scale([21.0, None, 5000.0])


def test_failed_and_missing_jobs_are_listed(tmp_path: Path, capsys):
    root = tmp_path / "sweep"
    job(root, 0, ["quantizer=rtn4"], {"original_q": {"accuracy": 0.75}})
    job(
        root,
        1,
        ["quantizer=rtn8"],
        {"original_q": {"accuracy": 0.5}},
        status="failed",
        error="RuntimeError: out of memory | at layer 3",
        quantizer="rtn8",
    )
    job(root, 2, ["quantizer=gguf_q4_0"], {}, results=False)  # stopped before results.json
    assert main([str(root), "--no-plots"]) == 0

    rows = read_csv(root / "report.csv")
    assert [(r["quantizer"], r["accuracy"]) for r in rows] == [("rtn4", "0.75")]
    md = (root / "report.md").read_text()
    assert "3 jobs: 1 complete, 2 not complete" in md
    assert "## Jobs that did not complete (2)" in md
    assert "| 1 | rtn8 | failed | original_q | RuntimeError: out of memory \\| at layer 3 |" in md
    assert "| 2 | gguf_q4_0 | missing | - | no results.json" in md
    assert not (root / "report_plots").exists()


def test_non_numeric_parameter_gives_bar_charts(tmp_path: Path, capsys):
    root = tmp_path / "sweep"
    for i, q in enumerate(("rtn4", "rtn8")):
        job(
            root,
            i,
            [f"quantizer={q}"],
            {"original_q": {"ref_ppl": 30.0 + i}, "attacked_q": {"ref_ppl": 900.0 - i}},
            quantizer=q,
        )
    assert main([str(root)]) == 0
    assert "quantizer is not numeric: grouped bar charts" in capsys.readouterr().out
    assert (root / "report_plots" / "ref_ppl_vs_quantizer.png").read_bytes().startswith(PNG)


def test_list_values_and_config_fallback_and_depth_two(tmp_path: Path, capsys):
    # attack.kappa=[k,k] is the number k; jobs two levels down (a date dir holding two sweeps)
    day = tmp_path / "2026-11-27"
    job(day / "10-00-00", 0, ["attack.kappa=[2,2]"], {"attacked_q": {"ref_ppl": 10.0}})
    job(day / "10-00-00", 1, ["attack.kappa=[64,64]"], {"attacked_q": {"ref_ppl": 5000.0}})
    job(day / "11-00-00", 0, ["attack.kappa=[8,8]"], {"attacked_q": {"ref_ppl": 50.0}})
    assert main([str(day)]) == 0
    rows = read_csv(day / "report.csv")
    assert [r["attack.kappa"] for r in rows] == ["[2,2]", "[64,64]", "[8,8]"]
    assert rows[2]["job"].startswith("11-00-00/0_")
    assert (day / "report_plots" / "ref_ppl_vs_attack.kappa.png").exists()

    # without .hydra/overrides.yaml the swept keys come from the resolved configs
    flat = tmp_path / "flat"
    job(flat, 0, None, {"original_q": {"accuracy": 0.5}}, quantizer="rtn4")
    job(flat, 1, None, {"original_q": {"accuracy": 0.25}}, quantizer="rtn8")
    assert main([str(flat), "--no-plots"]) == 0
    rows = read_csv(flat / "report.csv")
    assert list(rows[0])[:3] == ["job", "quantizer.name", "quantizer.bits"]
    assert [r["quantizer.bits"] for r in rows] == ["4", "8"]


def test_no_results_exits_2(tmp_path: Path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no results.json found" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2


VAL_BENCH = {"name": "svamp", "source": "file", "path": "val.jsonl", "limit": None}
TEST_BENCH = {"name": "svamp", "source": "embedded", "limit": None}


def val_and_test(tmp_path: Path, *, val_ids=("v1", "v2"), test_bench=TEST_BENCH):
    """Validation sweep (σ spelled 1e-4) and test sweep (σ spelled 0.0001) of three σ."""
    val, test = tmp_path / "val", tmp_path / "test"
    for i, (s_val, s_test) in enumerate((("1e-5", "1e-05"), ("1e-4", "0.0001"), ("1e-3", "0.001"))):
        job(
            val,
            i,
            ["defense=noise", f"defense.sigma={s_val}", "benchmark.path=val.jsonl"],
            {"original_q": {"accuracy": [0.2, 0.6, 0.4][i], "ref_ppl": [9.0, 30.0, 8.0][i]}},
            benchmark=VAL_BENCH,
            items={"original_q": list(val_ids)},
        )
        job(
            test,
            i,
            ["defense=noise", f"defense.sigma={s_test}"],
            {
                "original": {"accuracy": 0.7},
                "original_q": {"accuracy": [0.11, 0.55, 0.33][i], "ref_ppl": 12.0 + i},
            },
            benchmark=test_bench,
            items={"original_q": ["t1", "t2", "v2"][: 2 + (i == 1)] if val_ids != () else []},
        )
    return val, test


def test_select_picks_on_validation_and_reports_test_numbers(tmp_path: Path, capsys):
    val, test = val_and_test(tmp_path, val_ids=("v1", "v3"))
    args = [str(test), "--val", str(val), "--select", "original_q.accuracy:max", "--no-plots"]
    assert main(args) == 0
    sel = json.loads((test / "selection.json").read_text())
    (g,) = sel["groups"]
    assert g["chosen"] == {"defense.sigma": "1e-4"}
    assert g["val_value"] == 0.6 and g["val_candidates"] == 3 and g["ties"] == []
    (t,) = g["test"]
    assert t["job"] == "1_defense=noise,defense.sigma=0.0001"  # matched across spellings
    assert t["metrics"]["original_q"]["accuracy"] == 0.55
    assert t["item_overlap"] == 0
    md = (test / "report.md").read_text()
    assert "## Selection on the validation split" in md
    assert "validation accuracy: defense.sigma=1e-5: 0.2; defense.sigma=1e-4: 0.6;" in md
    assert "| defense.sigma=1e-4 | original_q | 0.55 | 13 |" in md
    assert "| defense.sigma=1e-4 | original | 0.7 | - |" in md
    assert "WARNING" not in md

    # default direction for a perplexity is min
    assert main([str(test), "--val", str(val), "--select", "original_q.ref_ppl"]) == 0
    sel = json.loads((test / "selection.json").read_text())
    assert sel["direction"] == "min"
    assert sel["groups"][0]["chosen"] == {"defense.sigma": "1e-3"}


def test_select_warns_when_items_overlap(tmp_path: Path, capsys):
    val, test = val_and_test(tmp_path)  # validation ids v1, v2; the σ=1e-4 test job has v2
    assert main([str(test), "--val", str(val), "--select", "original_q.accuracy"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 validation item ids also appear in test job 1_" in err
    assert "WARNING: 1 of 2 validation item ids" in (test / "report.md").read_text()


def test_select_refuses_the_test_split_itself(tmp_path: Path, capsys):
    val, test = val_and_test(tmp_path, test_bench=VAL_BENCH)
    assert main([str(test), "--val", str(val), "--select", "original_q.accuracy"]) == 2
    assert "same benchmark config" in capsys.readouterr().err
    assert main([str(test), "--select", "original_q.accuracy"]) == 2  # no --val
    assert "--select and --val go together" in capsys.readouterr().err
    assert main([str(test), "--val", str(val), "--select", "accuracy"]) == 2
    assert "CONDITION.METRIC" in capsys.readouterr().err


def test_select_per_group(tmp_path: Path, capsys):
    val, test = tmp_path / "val", tmp_path / "test"
    acc = {
        ("rtn4", "1e-4"): 0.3,
        ("rtn4", "1e-3"): 0.5,
        ("rtn8", "1e-4"): 0.9,
        ("rtn8", "1e-3"): 0.1,
    }
    for i, ((q, s), a) in enumerate(acc.items()):
        over = [f"quantizer={q}", f"defense.sigma={s}"]
        job(val, i, over, {"original_q": {"accuracy": a}}, quantizer=q, benchmark=VAL_BENCH)
        job(test, i, over, {"original_q": {"accuracy": a / 10}}, quantizer=q)
    args = [str(test), "--val", str(val), "--select", "original_q.accuracy:max", "--per"]
    assert main([*args, "quantizer", "--no-plots"]) == 0
    groups = json.loads((test / "selection.json").read_text())["groups"]
    assert [(g["per"], g["chosen"]["defense.sigma"]) for g in groups] == [
        ({"quantizer": "rtn4"}, "1e-3"),
        ({"quantizer": "rtn8"}, "1e-4"),
    ]
    assert groups[1]["test"][0]["metrics"]["original_q"]["accuracy"] == 0.09
    assert main([*args, "defense.noise"]) == 2


@pytest.mark.slow
def test_real_tiny_sweep_then_report(tmp_path: Path, cache_dir: Path):
    env = {**os.environ, "QEXP_CACHE_DIR": str(cache_dir)}
    sweep = tmp_path / "sweep"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "qexp",
            "-m",
            "model=tiny_llama",
            "logger=none",
            "benchmark.limit=2",
            "benchmark.max_new_tokens=4",
            "progress=false",
            "similarity.bertscore=false",
            "quantizer=rtn4,rtn8",
            "conditions=[original,original_q]",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "qexp.tools.report", str(sweep)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = read_csv(sweep / "report.csv")
    assert [(r_["quantizer"], r_["condition"]) for r_ in rows] == [
        ("none", "original"),
        ("rtn4", "original_q"),
        ("none", "original"),
        ("rtn8", "original_q"),
    ]
    for job_dir, pair in zip(sorted(sweep.glob("*/results.json")), (rows[:2], rows[2:])):
        conds = json.loads(job_dir.read_text())["conditions"]
        for row in pair:
            assert float(row["accuracy"]) == conds[row["condition"]]["accuracy"]
            assert float(row["ref_ppl"]) == conds[row["condition"]]["ref_ppl"]
    assert "| quantizer (swept) | condition | quantizer |" in r.stdout
    assert (sweep / "report_plots" / "ref_ppl_vs_quantizer.png").exists()


def test_wandb_offline_report_run(sigma_sweep: Path, capsys, monkeypatch):
    wandb = pytest.importorskip("wandb")
    seen, init = {}, wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or init(**kw))
    assert main([str(sigma_sweep), "--wandb", "--wandb-mode", "offline"]) == 0
    assert (seen["job_type"], seen["group"], seen["mode"]) == ("report", "sweep", "offline")
    (run,) = (sigma_sweep / "wandb").glob("offline-run-*")
    table = json.loads(next(run.rglob("report_*.table.json")).read_text())
    assert table["columns"][:4] == ["job", "defense.sigma", "condition", "quantizer"]
    assert len(table["data"]) == 6
    images = sorted(p.name.split("_vs_")[0] for p in run.rglob("media/images/plots/*.png"))
    assert images == ["accuracy", "cos_sim", "ref_ppl"]
    # the report's own files are not mistaken for jobs on a second pass
    assert main([str(sigma_sweep), "--no-plots"]) == 0
    assert len(read_csv(sigma_sweep / "report.csv")) == 6
