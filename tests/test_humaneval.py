"""benchmark=humaneval and the sandbox that runs model-written code."""

import json
import os
import time

import pytest

from qexp.benchmarks.humaneval import HumanEval, packaged_problems
from qexp.benchmarks.sandbox import bwrap_available, run_untrusted
from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate


def bench(**kw):
    return HumanEval(allow_code_execution=True, **kw)


def test_the_164_packaged_problems_and_their_canonical_solutions_pass():
    b = bench()
    items = b.items()
    assert len(items) == 164 and items[0]["id"] == "HumanEval/0"
    solutions = {r["task_id"]: r["canonical_solution"] for _, r in packaged_problems()}
    for it in items[:6]:  # the reference solutions pass; a wrong body fails
        verdict = b.judge(it, solutions[it["id"]])
        assert verdict == {"passed": True, "status": "passed", "timed_out": False, "parses": True}
        assert b.judge(it, "    return None\n")["passed"] is False
    assert b.judge(items[0], "    return (\n")["parses"] is False


def test_refused_without_allow_code_execution(make_cfg):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("benchmark=humaneval"))
    assert e.value.key == "benchmark.allow_code_execution" and "sandbox" in str(e.value)
    spec = validate(make_cfg("benchmark=humaneval", "benchmark.allow_code_execution=true"))
    assert spec.benchmark.timeout == 5.0


@pytest.mark.parametrize(
    "code, status",
    [
        ("while True:\n    pass\n", "timeout"),  # loops
        ("import time\ntime.sleep(60)\n", "timeout"),
        ("x = bytearray(8 * 2**30)\n", "failed"),  # allocates without bound
        ("x = []\nwhile True:\n    x.append(' ' * 2**20)\n", "failed"),
        ("import os\nos.system('echo hi')\n", "failed"),  # starts processes
        ("import subprocess\n", "failed"),
        ("import socket\n", "failed"),  # the network
    ],
)
def test_sandbox_stops_hostile_programs(code, status):
    start = time.monotonic()
    res = run_untrusted(code, timeout=2.0, memory_mb=256)
    assert res.status == status and not res.passed
    assert time.monotonic() - start < 10


def test_sandbox_confines_writes_and_hides_secrets(tmp_path, monkeypatch):
    outside = tmp_path / "canary.txt"
    for code in (
        f"open({str(outside)!r}, 'w').write('x')\n",
        f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)\n",
        f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
    ):
        (tmp_path / "keep.txt").write_text("keep")
        res = run_untrusted(code, timeout=5.0)
        assert res.status == "failed" and "PermissionError" in res.stderr_tail
        assert not outside.exists() and (tmp_path / "keep.txt").exists()
    # writing inside its own (empty, temporary) directory is allowed
    ok = run_untrusted("open('a.txt', 'w').write('x')\nassert open('a.txt').read() == 'x'\n")
    assert ok.passed
    monkeypatch.setenv("QEXP_TEST_SECRET", "s3cret")
    assert os.environ["QEXP_TEST_SECRET"] == "s3cret"
    res = run_untrusted("import os\nassert 'QEXP_TEST_SECRET' not in os.environ\n")
    assert res.passed  # the environment is not inherited


def test_sandbox_limits_are_set_by_the_child_not_in_preexec_fn(monkeypatch):
    """The limits hold inside the program (read back from /proc), and the parent starts the
    child without `preexec_fn` (unsafe while the pipeline's heartbeat thread runs)."""
    import subprocess

    seen = []
    real = subprocess.Popen

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    code = (
        "lim = open('/proc/self/limits').read()\n"
        "rows = {l[:26].strip(): l[26:].split() for l in lim.splitlines()[1:]}\n"
        "assert rows['Max address space'][:2] == [str(300 << 20)] * 2, rows\n"
        "assert rows['Max cpu time'][:2] == ['3', '3'], rows\n"
        "assert rows['Max open files'][:2] == ['64', '64'], rows\n"
        "assert rows['Max core file size'][:2] == ['0', '0'], rows\n"
    )
    res = run_untrusted(code, timeout=2.0, memory_mb=300)
    assert res.passed, res.stderr_tail
    assert seen and all("preexec_fn" not in kw for kw in seen)


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap is not installed")
def test_bwrap_contains_what_the_python_guard_misses(tmp_path):
    """The guard patches open/os.open, not `_io.FileIO`: without bubblewrap that write lands
    outside the program's directory; inside bubblewrap the file system is read-only but for
    the program's directory and a private /tmp, so it never reaches the real one."""
    outside = tmp_path / "canary.txt"
    code = f"import _io\n_io.FileIO({str(outside)!r}, 'w').write(b'x')\n"
    assert run_untrusted(code, timeout=5.0).passed and outside.exists()  # the guard's gap
    outside.unlink()
    res = run_untrusted(code, timeout=5.0, isolation="bwrap")
    assert not outside.exists()  # written to bubblewrap's private /tmp, or refused
    for hostile in ("while True:\n    pass\n", "import socket\n", "x = bytearray(8 * 2**30)\n"):
        assert not run_untrusted(hostile, timeout=2.0, memory_mb=256, isolation="bwrap").passed
    ok = run_untrusted("open('a.txt', 'w').write('x')\n", timeout=5.0, isolation="bwrap")
    assert ok.passed and res.returncode is not None


def test_isolation_bwrap_without_bubblewrap_is_a_config_error(make_cfg, monkeypatch):
    from qexp.benchmarks import humaneval

    monkeypatch.setattr(humaneval, "bwrap_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        validate(
            make_cfg(
                "benchmark=humaneval",
                "benchmark.allow_code_execution=true",
                "benchmark.isolation=bwrap",
            )
        )
    assert e.value.key == "benchmark.isolation" and "bubblewrap" in e.value.allowed


def test_pipeline_reports_pass_at_1(make_cfg, tmp_path):
    cfg = make_cfg(
        "benchmark=humaneval",
        "benchmark.allow_code_execution=true",
        "benchmark.limit=2",
        "benchmark.max_new_tokens=8",
        "conditions=[original]",
    )
    res = run(cfg, tmp_path)
    m = res.conditions["original"]
    assert 0.0 <= m["pass_at_1"] <= 1.0 and m["n_items"] == 2 and "code_parse_rate" in m
    rows = [json.loads(x) for x in (tmp_path / "generations" / "original.jsonl").open()]
    assert {r["status"] for r in rows} <= {"passed", "failed", "timeout"}
    assert rows[0]["id"] == "HumanEval/0"
