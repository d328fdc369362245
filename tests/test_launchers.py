"""Sweep launchers (conf/hydra/launcher/*.yaml, docs/launchers.md) on the tiny model."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.conftest import TINY as CONFTEST_TINY

# parallel job pools and Ray instances (whose processes the tests count) need the machine
# to themselves: `make test` runs these after the parallel part of the suite
pytestmark = pytest.mark.serial

# fast jobs: tiny random model, 4 items, 8 tokens, one thread per job, no similarity encoders
TINY = [*CONFTEST_TINY, "threads=1", "similarity.enabled=false", "conditions=[original,original_q]"]


def qexp(*args, cache_dir, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qexp", "-m", *args, f"cache_dir={cache_dir}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def statuses(sweep_dir: Path) -> list:
    jobs = sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name.split("_")[0]))
    return [json.loads(j.read_text())["status"] for j in jobs]


def test_local_launcher_runs_jobs_in_parallel_resumes_and_reports_failures(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "s"
    args = ["hydra/launcher=local", *TINY, f"hydra.sweep.dir={sweep}"]
    p = qexp(*args, "quantizer=rtn4,rtn8", cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in p.stdout
    assert statuses(sweep) == ["complete", "complete"]
    first = {j: j.stat().st_mtime_ns for j in sweep.glob("*/results.json")}

    # same sweep plus two jobs that fail (config error) in the worker processes: the two
    # complete jobs are skipped, the failures show in results.json and in the exit status
    p = qexp(*args, "benchmark.limit=4,-3", "quantizer=rtn4,rtn8", cache_dir=cache_dir)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stderr.count("skipped") == 2
    assert "qexp: 2 job(s) failed" in p.stderr
    assert {j: j.stat().st_mtime_ns for j in first} == first
    assert statuses(sweep) == ["complete", "complete", "failed", "failed"]


def test_slurm_config_writes_the_documented_sbatch_keys(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # no cluster here: a fake srun (submitit looks for it) and a fake sbatch that keeps the
    # submission script and refuses the job
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("srun", "exit 1"), ("sbatch", 'cp "$1" "$SBATCH_CAPTURE"; exit 1')]:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "fake {name}" >&2\n{body}\n')
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_CAPTURE": str(script)}
    keys = {
        "partition": "gpu",
        "account": "proj42",
        "qos": "normal",
        "timeout_min": "90",
        "cpus_per_task": "4",
        "gpus_per_node": "1",
        "mem_gb": "32",
        "array_parallelism": "1",
    }
    p = qexp(
        "hydra/launcher=slurm",
        *TINY,
        "quantizer=rtn4,rtn8",
        *(f"hydra.launcher.{k}={v}" for k, v in keys.items()),
        'hydra.launcher.setup=["export QEXP_CACHE_DIR=/shared/qexp-cache"]',
        f"hydra.sweep.dir={tmp_path / 's'}",
        cache_dir=cache_dir,
        env=env,
    )
    assert p.returncode != 0 and "fake sbatch" in p.stderr, p.stderr[-2000:]
    lines = script.read_text().splitlines()
    for flag in [
        "--partition=gpu",
        "--account=proj42",
        "--qos=normal",
        "--time=90",
        "--cpus-per-task=4",
        "--gpus-per-node=1",
        "--mem=32GB",
        "--array=0-1%1",  # two jobs, one at a time
        "--job-name=qexp",
    ]:
        assert f"#SBATCH {flag}" in lines, flag
    assert "export QEXP_CACHE_DIR=/shared/qexp-cache" in lines
    assert any(x.startswith("srun ") and sys.executable in x for x in lines)


def test_submitit_local_executor_runs_a_job(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "s"
    args = ["hydra/launcher=submitit_local", *TINY, f"hydra.sweep.dir={sweep}"]
    p = qexp(*args, cache_dir=cache_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert statuses(sweep) == ["complete"]
    assert list(sweep.glob(".submitit/*/*_log.out"))


def ray_pids() -> set:
    """Processes of any Ray instance on this machine (Linux /proc)."""
    pids = set()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if any(s in cmd for s in (b"raylet", b"gcs_server", b"ray::", b"ray/_private/")):
            pids.add(int(d.name))
    return pids


def wait_for_no_new_ray_processes(before: set, timeout_s: float = 30) -> set:
    deadline = time.monotonic() + timeout_s
    while (left := ray_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_ray_launcher_runs_a_sweep_on_a_ray_instance_the_test_started(tmp_path, cache_dir):
    ray = pytest.importorskip("ray")
    before = ray_pids()
    sweep = tmp_path / "s"
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        gcs = ctx.address_info["gcs_address"]
        p = qexp(
            "hydra/launcher=ray",
            f"hydra.launcher.address={gcs}",
            *TINY,
            "quantizer=rtn4,rtn8",
            f"hydra.sweep.dir={sweep}",
            cache_dir=cache_dir,
        )
    finally:
        ray.shutdown()
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Ray launcher is launching 2 jobs" in p.stdout
    assert statuses(sweep) == ["complete", "complete"]
    assert not wait_for_no_new_ray_processes(before)


def test_ray_launcher_local_instance_reports_failed_jobs_and_stops(tmp_path, cache_dir):
    pytest.importorskip("ray")
    before = ray_pids()
    sweep = tmp_path / "s"
    p = qexp(
        "hydra/launcher=ray",  # address null: the launcher starts and stops its own instance
        "hydra.launcher.init.num_cpus=2",
        *TINY,
        "benchmark.limit=-3",  # a config error, raised in the Ray worker
        "seed=0",
        f"hydra.sweep.dir={sweep}",
        cache_dir=cache_dir,
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Started a local Ray instance" in p.stderr
    assert "qexp: 1 job(s) failed" in p.stderr
    assert statuses(sweep) == ["failed"]
    assert not wait_for_no_new_ray_processes(before)
