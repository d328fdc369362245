"""`python -m qexp` and the `qexp` console script as a user runs them."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import CLI_TINY as TINY
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def qexp(*args, cache_dir):
    env = {**os.environ, "QEXP_CACHE_DIR": str(cache_dir)}
    return subprocess.run(
        [sys.executable, "-m", "qexp", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_run_writes_results_and_prints_table(tmp_path, cache_dir):
    p = qexp(*TINY, "quantizer=rtn4", f"hydra.run.dir={tmp_path}", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr
    body = json.loads((tmp_path / "results.json").read_text())
    assert "accuracy" in body["conditions"]["original"]
    assert "original_q" in p.stdout and "ref_ppl" in p.stdout


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("benchmark.limit=-3", "benchmark.limit=-3"),
        ("conditions=[foo]", "conditions='foo'"),
        ("quantizer=gptq5", "gptq5"),
    ],
)
def test_config_error_exit_code_and_message(tmp_path, cache_dir, override, needle):
    p = qexp(*TINY, override, f"hydra.run.dir={tmp_path}", cache_dir=cache_dir)
    assert p.returncode != 0
    assert needle in p.stderr
    assert not (tmp_path / "results.json").exists()


def test_console_script_is_installed():
    exe = shutil.which("qexp", path=os.path.dirname(sys.executable))
    assert exe is not None
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "quantizer" in p.stdout


@pytest.mark.parametrize(
    ("experiment", "n_jobs"),
    [("encrypt_ablation", 4), ("encrypt_kappa", 6), ("encrypt_eps", 5), ("encrypt_gamma", 5)],
)
def test_encrypt_experiments_sweep_on_a_tiny_model(tmp_path, cache_dir, experiment, n_jobs):
    p = qexp(
        f"experiment={experiment}",
        *TINY,
        "attack.kappa_one_layers=0",
        "conditions=[original,attacked]",
        f"hydra.sweep.dir={tmp_path}",
        cache_dir=cache_dir,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    jobs = sorted(tmp_path.glob("*/results.json"))
    assert len(jobs) == n_jobs
    for j in jobs:
        body = json.loads(j.read_text())
        assert body["status"] == "complete"
        assert body["config"]["attack"]["name"] == "encrypt"
        assert body["function_preservation"]["max_abs_logit_diff_fp32"] < 1e-3


def test_sweep_resumes_and_goes_on_after_a_failed_job(tmp_path, cache_dir):
    sweep = ["-m", *TINY, "quantizer=rtn4,rtn8", "conditions=[original,original_q]"]
    sweep.append(f"hydra.sweep.dir={tmp_path / 's'}")
    p = qexp(*sweep, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    first, second = sorted((tmp_path / "s").glob("*/results.json"))
    # as if the sweep had been killed during the second job
    body = json.loads(second.read_text())
    body["status"] = "running"
    second.write_text(json.dumps(body))
    before = first.read_bytes(), first.stat().st_mtime_ns
    p = qexp(*sweep, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped" in p.stderr
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert json.loads(second.read_text())["status"] == "complete"

    failing = ["-m", *TINY, "attack=encrypt", "attack.kappa_one_layers=0"]
    failing += ["attack.tolerance=1e-12,1.0", "conditions=[original,attacked]"]
    failing.append(f"hydra.sweep.dir={tmp_path / 'f'}")
    p = qexp(*failing, cache_dir=cache_dir)
    assert p.returncode == 1 and "1 job(s) failed" in p.stderr
    bodies = [json.loads(j.read_text()) for j in sorted((tmp_path / "f").glob("*/results.json"))]
    assert [b["status"] for b in bodies] == ["failed", "complete"]
    assert "PreservationError" in bodies[0]["error"]
