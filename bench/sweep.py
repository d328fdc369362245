"""A 6-point σ sweep with the stage cache vs. 6 independent runs without it (wall-time ratio).

The sweep is the interval-calibrated noise defense against the gap attack: `attack=gap
defense=noise defense.sigma=<6 values> quantizer=bnb_nf4 benchmark=instruct`, four conditions.

- baseline: 6 separate `python -m qexp ... cache=off` processes, one per σ (each loads the
  model, trains A(M), evaluates all four conditions);
- cached: one `python -m qexp -m ... defense.sigma=a,b,...` sweep with `cache=on` in a fresh
  cache dir (A(M), `original` and `attacked` are computed once; each σ only defends,
  quantizes and evaluates its two quantized conditions).

Both runs use the same config, so their results must agree (checked, timings excluded). The
attack and benchmark are shortened by default so the baseline fits in minutes on 2 CPU cores:

    python bench/sweep.py [--inject-steps 20 --repair-steps 20 --limit 16 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qexp.core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = ["1e-4", "1e-3", "5e-3", "1e-2", "2e-2", "per_layer"]


def qexp(args: list[str], cache_dir: Path) -> float:
    """Run `python -m qexp args` and return its wall time; fail loudly on error."""
    env = {**os.environ, "QEXP_CACHE_DIR": str(cache_dir)}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "qexp", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if p.returncode != 0:
        raise SystemExit(f"qexp {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def untimed(path: Path) -> dict:
    """A results.json's conditions without the wall-clock metric."""
    body = json.loads(path.read_text())
    assert body["status"] == "complete", path
    return {
        c: {k: v for k, v in m.items() if k != "tokens_per_s"}
        for c, m in body["conditions"].items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inject-steps", type=int, default=20)
    ap.add_argument("--repair-steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=16, help="instruct items per condition")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep.json"))
    a = ap.parse_args()
    common = [
        "attack=gap",
        f"attack.inject_steps={a.inject_steps}",
        f"attack.repair_steps={a.repair_steps}",
        "defense=noise",
        "defense.diagnostics=false",
        "quantizer=bnb_nf4",
        "benchmark=instruct",
        f"benchmark.limit={a.limit}",
        f"benchmark.max_new_tokens={a.max_new_tokens}",
        "logger=none",
        "progress=false",
        f"threads={a.threads}",
    ]
    with tempfile.TemporaryDirectory(prefix="qexp-bench-sweep-") as tmp:
        tmp = Path(tmp)
        # the embedded model's one-off conversion is not part of either measurement
        warm = ["benchmark=none", "conditions=[original]", "logger=none", "cache=off"]
        qexp([*warm, f"hydra.run.dir={tmp}/warm"], tmp / "models")
        base_times = []
        for i, s in enumerate(SIGMAS):
            run = [*common, f"defense.sigma={s}", "cache=off", f"hydra.run.dir={tmp}/b{i}"]
            base_times.append(qexp(run, tmp / "models"))
            print(f"baseline sigma={s}: {base_times[-1]:.1f} s", flush=True)
        cached = qexp(
            [
                "-m",
                *common,
                "defense.sigma=" + ",".join(SIGMAS),
                "cache=on",
                f"hydra.sweep.dir={tmp}/sweep",
            ],
            tmp / "models",
        )
        print(f"cached sweep: {cached:.1f} s", flush=True)
        jobs = sorted((tmp / "sweep").glob("*/results.json"))
        assert len(jobs) == len(SIGMAS)
        agree = all(
            untimed(tmp / f"b{i}" / "results.json") == untimed(j) for i, j in enumerate(jobs)
        )
    baseline = sum(base_times)
    result = {
        "bench": "sweep",
        "sweep": {"defense.sigma": SIGMAS},
        "config": common,
        "baseline_independent_runs_s": [round(t, 2) for t in base_times],
        "baseline_total_s": round(baseline, 2),
        "cached_sweep_s": round(cached, 2),
        "ratio_cached_over_baseline": round(cached / baseline, 3),
        "goal_ratio": 0.4,
        "results_identical": agree,
    }
    print(json.dumps(result, indent=2))
    atomic_write_json(a.out, result)
    if not agree:
        raise SystemExit("the cached sweep's results differ from the independent runs")


if __name__ == "__main__":
    main()
