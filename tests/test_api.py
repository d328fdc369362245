"""The Python API (qexp/api.py): `qexp.run` as the command line runs, `qexp.load` as a
DataFrame, runs that differ only in seed aggregated (here and in qexp-report)."""

import json
import math

import pytest

import qexp
from qexp.core.errors import ConfigError
from qexp.core.stats import wilson
from qexp.tools.report import main as report_main
from tests.conftest import TINY
from tests.test_errors import cli

pytestmark = pytest.mark.slow


def test_run_writes_what_the_command_line_writes(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("QEXP_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = qexp.run([*TINY, "attack=encrypt", "attack.kappa_one_layers=0"], run_dir=tmp_path / "r")
    assert res.status == "complete" and res.run_dir == tmp_path / "r"
    for f in (".hydra/config.yaml", ".hydra/overrides.yaml", "qexp.log", "results.json"):
        assert (tmp_path / "r" / f).is_file(), f
    body = json.loads((tmp_path / "r" / "results.json").read_text())
    assert body["conditions"] == res.conditions and body["intervals"] == res.intervals
    assert set(body["comparisons"]) == {
        "attacked vs original",
        "original_q vs original",
        "attacked_q vs original_q",
    }
    # every rate's interval is the Wilson interval of the records behind it
    records = [
        json.loads(line)
        for line in (tmp_path / "r" / "generations" / "attacked_q.jsonl").read_text().splitlines()
    ]
    k, n = sum(r["correct"] for r in records), len(records)
    assert res.conditions["attacked_q"]["accuracy"] == k / n
    assert res.intervals["attacked_q"]["accuracy"] == wilson(k, n)
    again = qexp.run([*TINY, "attack=encrypt", "attack.kappa_one_layers=0"], run_dir=tmp_path / "r")
    assert again.conditions == res.conditions  # complete: read back, not run again
    with pytest.raises(ConfigError, match="quantizer='nope'"):
        qexp.run(["quantizer=nope"], run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_load_a_two_seed_sweep_with_its_aggregate(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    p = cli(
        "-m",
        *TINY,
        "seed=0,1",
        "benchmark.do_sample=true",
        "conditions=[original,original_q]",
        f"hydra.sweep.dir={sweep}",
        cache_dir=cache_dir,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    df = qexp.load(sweep)
    assert {"run", "seed", "condition", "metric", "value", "lo", "hi", "interval", "n"} <= set(df)
    runs = df[~df["aggregate"]]
    assert sorted(runs["seed"].unique()) == [0, 1]
    agg = df[df["aggregate"] & (df["condition"] == "original_q") & (df["metric"] == "ref_ppl")]
    assert len(agg) == 1
    row = agg.iloc[0]
    per_seed = runs[(runs["condition"] == "original_q") & (runs["metric"] == "ref_ppl")]["value"]
    assert row["value"] == pytest.approx(per_seed.mean()) and row["n_seeds"] == 2
    assert row["sd"] == pytest.approx(per_seed.std(ddof=1))
    assert math.isnan(row["lo"]) or row["lo"] <= row["value"] <= row["hi"]
    acc = runs[(runs["metric"] == "accuracy")]
    assert (acc["interval"] == "wilson").all() and (acc["lo"] <= acc["value"]).all()
    # one run directory reads the same way, without swept columns
    one = qexp.load(next(sweep.glob("0_*")))
    assert "seed" not in one and set(one["condition"]) == {"original", "original_q"}
    # qexp-report says it aggregated the seeds
    assert report_main([str(sweep), "--no-plots"]) == 0
    md = (sweep / "report.md").read_text()
    assert "differ only in `seed`" in md and "mean of 2" in md
