"""experiment=matrix: the smoke matrix runs, plans itself, records n/a cells, and
qexp-report draws its heatmaps."""

from __future__ import annotations

import csv
import json

import pytest
from omegaconf import OmegaConf

from qexp.core.registry import compose_overrides, options
from qexp.pipeline.matrix import by_quantizer, plan
from qexp.tools.report import main as report_main
from tests.conftest import qexp_batch

SMOKE = [
    "experiment=matrix",
    "matrix.size=smoke",
    "logger=none",
    "progress=false",
    "similarity.bertscore=false",
    "cache=on",
]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("matrix")
    cases = [
        [*SMOKE, f"hydra.sweep.dir={root / 'smoke'}"],
        # gap has no boxes under GPTQ, per-layer noise no intervals: both cells are n/a
        [*SMOKE, "attack=gap", "quantizer=gptq4", f"hydra.sweep.dir={root / 'na'}"],
        [*SMOKE, "matrix.size=huge", f"hydra.sweep.dir={root / 'bad'}"],
        # the prune axis: prune_gap needs a pruning setting (n/a under prune=none)
        [
            *SMOKE,
            "attack=prune_gap",
            "attack.inject_steps=6",
            "attack.repair_steps=6",
            "defense=none",
            "prune=none,magnitude",
            f"hydra.sweep.dir={root / 'prune'}",
        ],
    ]
    return root, qexp_batch(cases, root, cache_dir, timeout=1800)


def test_smoke_matrix_runs_with_its_plan_and_heatmaps(sweeps):
    root, (smoke, *_) = sweeps
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert "qexp matrix (smoke): 4 cells (2 attacks × 2 defenses × 1 quantizers)" in smoke.stderr
    p = json.loads((root / "smoke" / "matrix_plan.json").read_text())
    assert p["cells"] == 4 and p["stages"]["attack"] == 2 and p["stages"]["original_q"] == 2
    assert p["estimated_seconds"] > 0
    jobs = sorted((root / "smoke").glob("*/results.json"))
    assert len(jobs) == 4
    assert all(json.loads(j.read_text())["status"] == "complete" for j in jobs)
    assert report_main([str(root / "smoke")]) == 0
    rows = list(csv.DictReader((root / "smoke" / "matrix.csv").open()))
    assert {(r["attack"], r["defense"]) for r in rows} == {
        (a, d) for a in ("encrypt_exact", "gap") for d in ("none", "noise")
    }
    for r in rows:
        assert r["status"] == "complete" and 0 <= float(r["success"]) <= 1
        assert float(r["utility_cost"]) > 0
    assert (root / "smoke" / "report_plots" / "matrix_tiny_llama_rtn4.png").stat().st_size > 0
    assert "Attack × defense × quantizer matrix" in (root / "smoke" / "report.md").read_text()


def test_cells_that_do_not_apply_are_na_not_failures(sweeps):
    root, (_, na, *_) = sweeps
    assert na.returncode == 0, na.stderr[-3000:]
    bodies = [json.loads(j.read_text()) for j in sorted((root / "na").glob("*/results.json"))]
    assert len(bodies) == 2 and all(b["status"] == "n/a" for b in bodies)
    assert any("attack.targets" in b["error"] and "gptq4" in b["error"] for b in bodies)
    assert report_main([str(root / "na")]) == 0
    rows = list(csv.DictReader((root / "na" / "matrix.csv").open()))
    assert {r["status"] for r in rows} == {"n/a"} and all(r["note"] for r in rows)


def test_unknown_matrix_size_is_one_config_error(sweeps):
    _, (_, _, bad, _) = sweeps
    assert bad.returncode == 2
    assert "matrix.size" in bad.stderr and "smoke" in bad.stderr and "Traceback" not in bad.stderr


def test_prune_axis_runs_and_reports_per_setting(sweeps):
    root, (*_, pruned) = sweeps
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    assert "2 cells (1 attacks × 1 defenses × 2 prune settings × 1 quantizers)" in pruned.stderr
    p = json.loads((root / "prune" / "matrix_plan.json").read_text())
    assert p["axes"]["prune"] == ["none", "magnitude"] and p["stages"]["attack"] == 2
    bodies = {
        json.loads(j.read_text())["config"]["prune"]["name"]: json.loads(j.read_text())
        for j in (root / "prune").glob("*/results.json")
    }
    assert bodies["none"]["status"] == "n/a" and "attack.targets" in bodies["none"]["error"]
    assert bodies["magnitude"]["status"] == "complete"
    assert report_main([str(root / "prune")]) == 0
    rows = {r["prune"]: r for r in csv.DictReader((root / "prune" / "matrix.csv").open())}
    assert rows["none"]["status"] == "n/a" and rows["magnitude"]["status"] == "complete"
    assert 0 <= float(rows["magnitude"]["success"]) <= 1
    plot = root / "prune" / "report_plots" / "matrix_tiny_llama_magnitude_rtn4.png"
    assert plot.stat().st_size > 0


def test_full_matrix_holds_every_option():
    cfg = compose_overrides(["experiment=matrix", "matrix.size=full"])
    full = cfg.matrix.sizes.full
    # attack=none is the original itself; every other option of every group is in the list
    for group in ("attack", "defense", "prune", "quantizer"):
        every = [o for o in options(group) if o != "none" or group in ("defense", "prune")]
        assert sorted(full[group].split(",")) == every, group


def test_plan_counts_shared_stages():
    """gap trains once per quantizer (its targets follow it), the others once."""
    cfg = compose_overrides(["experiment=matrix", "matrix.size=small"])
    cfg.hydra.overrides.task = ["experiment=matrix", "matrix.size=small", "quantizer=rtn4,bnb_nf4"]
    p = plan(cfg)
    assert p["cells"] == 18 and p["axes"]["quantizer"] == ["rtn4", "bnb_nf4"]
    assert p["stages"] == {"attack": 4, "original_q": 6, "attacked_q": 18, "original": 1}
    assert p["axes"]["prune"] == ["none"]
    gap = OmegaConf.to_container(cfg.matrix.cost.attack.gap)  # follows the quantizer's grid
    assert (
        by_quantizer(gap, "rtn4") == gap["rtn"] and by_quantizer(gap, "bnb_nf4") == gap["default"]
    )
    assert p["estimated_seconds"] > gap["rtn"] + gap["default"]  # both gap trainings counted
    single = []
    for q in ("rtn4", "bnb_nf4"):
        cfg.hydra.overrides.task = ["experiment=matrix", "matrix.size=small", f"quantizer={q}"]
        single.append(plan(cfg)["estimated_seconds"])
    assert max(single) < p["estimated_seconds"] < sum(single)  # shared stages counted once


def test_plan_counts_prune_stages():
    """prune_gap trains once per pruning setting; each setting prunes every branch."""
    cfg = compose_overrides(["experiment=matrix", "matrix.size=pruning"])
    cfg.hydra.overrides.task = ["experiment=matrix", "matrix.size=pruning"]
    p = plan(cfg)
    assert p["axes"]["prune"] == ["magnitude", "wanda", "sparsegpt"]
    assert p["cells"] == 3 * 2 * 2 and p["stages"]["attack"] == 3
    assert p["stages"]["original_q"] == 2 * 3 * 2
    cost = cfg.matrix.cost
    cfg.hydra.overrides.task = ["experiment=matrix", "matrix.size=pruning", "prune=magnitude"]
    mag = plan(cfg)["estimated_seconds"]
    cfg.hydra.overrides.task = ["experiment=matrix", "matrix.size=pruning", "prune=wanda"]
    wanda = plan(cfg)["estimated_seconds"]
    # 4 branches per attack (2 defenses × 2 quantizers) plus 4 originals are pruned
    assert wanda - mag == pytest.approx(8 * (cost.prune.wanda - cost.prune.magnitude), abs=0.2)
