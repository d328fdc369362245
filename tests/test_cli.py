"""`python -m qexp` and the `qexp` console script as a user runs them."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import CLI_TINY as TINY
from tests.conftest import ROOT, qexp_batch

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


CONFIG_ERRORS = [
    ("benchmark.limit=-3", "benchmark.limit=-3"),
    ("conditions=[foo]", "conditions='foo'"),
    ("quantizer=gptq5", "gptq5"),
]


@pytest.fixture(scope="module")
def config_error_runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("config-errors")
    cases = [[*TINY, o, f"hydra.run.dir={root / str(i)}"] for i, (o, _) in enumerate(CONFIG_ERRORS)]
    return root, qexp_batch(cases, root, cache_dir)


@pytest.mark.parametrize(
    ("i", "override", "needle"), [(i, *c) for i, c in enumerate(CONFIG_ERRORS)]
)
def test_config_error_exit_code_and_message(config_error_runs, i, override, needle):
    root, runs = config_error_runs
    assert runs[i].returncode == 2
    assert needle in runs[i].stderr
    assert not (root / str(i) / "results.json").exists()


def test_console_script_is_installed():
    exe = shutil.which("qexp", path=os.path.dirname(sys.executable))
    assert exe is not None
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "quantizer" in p.stdout


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
