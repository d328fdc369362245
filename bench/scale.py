"""Real scale on CPU: an 8B checkpoint through the streaming tools, and the pipeline's memory.

1. A synthetic Llama-3-8B-shaped checkpoint (bench/synthetic.py: bf16, 4 shards + index,
   16 GB): `qexp-encrypt`, `qexp-canonicalize` and `qexp-audit` (every static check, default
   targets), each a child process, each between two copies of the same directory (`cp -r`,
   then `sync`: the tools fsync what they write, `cp` does not), the page cache dropped
   before every step where the kernel allows it: seconds, ratio to the mean of the copies
   around it (`cp -r` alone and `cp -r` + `sync`), peak RSS (the child's VmHWM, polled).
   Goals: <= 1.3x the copy, <= 1.5 GB. This disk's speed drifts over minutes, hence the
   copies on both sides of every tool.
2. A synthetic Llama-3.2-1B-shaped checkpoint (bf16, the embedded tokenizer) through the
   pipeline on CPU (`attack=encrypt attack.preset=exact quantizer=rtn4 benchmark=none`,
   dtype=bfloat16, stage cache on): peak RSS per stage from results.json `memory` against
   the model's bytes.

    python bench/scale.py [--dir outputs/scale] [--skip-8b] [--skip-1b] [--keep]

Needs about 3 x 16 GB of free disk for part 1 (source, one output at a time). Writes
<dir>/scale.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import write_checkpoint

from qexp.core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def drop_caches() -> bool:
    """Drop the page cache (needs root); False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Exit code, wall seconds and peak RSS (MB) of one child process. The peak is the
    child's VmHWM polled every 0.1 s (its rusage would count this bench's own pages, which
    a forked child carries until it execs)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _hwm_mb(proc.pid) or 0.0)
            time.sleep(0.1)
        log.seek(0)
        out = log.read().decode(errors="replace")
    row = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    row["peak_rss_mb"] = round(peak, 1)
    if proc.returncode not in (0, 1):
        row["tail"] = out[-2000:]
    return row


def durable_copy(src: Path, dst: Path) -> dict:
    """`cp -r` then `sync`, timed apart."""
    shutil.rmtree(dst, ignore_errors=True)
    drop_caches()
    cp = timed(["cp", "-r", str(src), str(dst)])
    t0 = time.perf_counter()
    os.sync()
    cp["sync_s"] = round(time.perf_counter() - t0, 1)
    cp["durable_s"] = round(cp["seconds"] + cp["sync_s"], 1)
    shutil.rmtree(dst, ignore_errors=True)
    return cp


def embedded_dir() -> Path:
    """The converted embedded checkpoint (its tokenizer), converting it on first use."""
    sys.path.insert(0, str(ROOT / "bench"))
    from encrypt import embedded_checkpoint

    return embedded_checkpoint()


def part_8b(work: Path, keep: bool) -> dict:
    src = work / "llama3_8b"
    if not (src / "model.safetensors.index.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        info = write_checkpoint(src, "llama3_8b")  # Llama-3's own vocabulary: 128256
    else:
        info = {"geometry": "llama3_8b", "reused": True}
    info["bytes"] = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    py = [sys.executable, "-m"]
    out = work / "out"
    tools = {
        "encrypt": [*py, "qexp.tools.encrypt", str(src), str(out), "--no-progress"],
        "canonicalize": [*py, "qexp.tools.canonicalize", str(src), str(out), "--no-progress"],
        "audit": [
            *py,
            "qexp.audit",
            str(src),
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
            "--seed",
            "0",
        ],
    }
    copies = [durable_copy(src, out)]
    print("copy", json.dumps(copies[-1]), flush=True)
    rows: dict[str, dict] = {}
    dropped = drop_caches()
    for name, cmd in tools.items():
        shutil.rmtree(out, ignore_errors=True)
        dropped &= drop_caches()
        row = timed(cmd)
        if name == "audit" and (out / "audit.json").is_file():
            rep = json.loads((out / "audit.json").read_text())
            row.update(
                verdict=rep["verdict"],
                suspicious_checks=rep["suspicious_checks"],
                threads=rep["threads"],
            )
        shutil.rmtree(out, ignore_errors=True)
        copies.append(durable_copy(src, out))
        print("copy", json.dumps(copies[-1]), flush=True)
        around = copies[-2:]
        cp = sum(c["seconds"] for c in around) / 2
        durable = sum(c["durable_s"] for c in around) / 2
        row.update(
            copy_s=round(cp, 1),
            durable_copy_s=round(durable, 1),
            ratio_to_copy=round(row["seconds"] / cp, 2),
            ratio_to_durable_copy=round(row["seconds"] / durable, 2),
        )
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    if not keep:
        shutil.rmtree(src)
    return {
        "checkpoint": info,
        "page_cache_dropped_before_each": dropped,
        "cores": len(os.sched_getaffinity(0)),
        "copies": copies,
        "rows": rows,
        "goals": {"ratio_to_copy": 1.3, "peak_rss_mb": 1536},
    }


def part_1b(work: Path, keep: bool) -> dict:
    src = work / "llama3_1b"
    shutil.rmtree(src, ignore_errors=True)
    info = write_checkpoint(src, "llama3_1b", embedded_dir())
    run_dir, cache = work / "run_1b", work / "cache_1b"
    for d in (run_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "qexp",
        "model=hf",
        f"model.id={src}",
        "dtype=bfloat16",
        "attack=encrypt",
        "attack.preset=exact",
        "quantizer=rtn4",
        "benchmark=none",
        "logger=none",
        "progress=false",
        "similarity.enabled=false",
        f"hydra.run.dir={run_dir}",
    ]
    row = timed(cmd, {**os.environ, "QEXP_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"})
    body = json.loads((run_dir / "results.json").read_text())
    mem = body["memory"]
    model_mb = mem["model_bytes"] / 2**20
    base = mem["baseline_rss_mb"]
    stages = {
        k: {"peak_rss_mb": v, "over_baseline_in_models": round((v - base) / model_mb, 2)}
        for k, v in mem["peak_rss_mb"].items()
    }
    if not keep:
        for d in (src, run_dir, cache):
            shutil.rmtree(d, ignore_errors=True)
    return {
        "checkpoint": info,
        "command": " ".join(cmd[1:]),
        "status": body["status"],
        "wall_s": row["seconds"],
        "process_peak_rss_mb": row["peak_rss_mb"],
        "model_mb": round(model_mb, 1),
        "baseline_rss_mb": base,
        "plan": mem.get("plan"),
        "stages": stages,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=ROOT / "outputs" / "scale")
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument("--skip-1b", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    out_path = a.dir / "scale.json"
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if not a.skip_8b:
        res["8b"] = part_8b(a.dir, a.keep)
        atomic_write_json(out_path, res)
    if not a.skip_1b:
        res["1b_pipeline"] = part_1b(a.dir, a.keep)
        atomic_write_json(out_path, res)
    if "8b" in res:
        print(
            "| tool | seconds | cp -r around it (s) | ratio | cp -r + sync (s) | ratio | "
            "peak RSS MB |\n|---|---:|---:|---:|---:|---:|---:|"
        )
        for name, r in res["8b"]["rows"].items():
            print(
                f"| {name} | {r['seconds']} | {r['copy_s']} | {r['ratio_to_copy']} | "
                f"{r['durable_copy_s']} | {r['ratio_to_durable_copy']} | {r['peak_rss_mb']} |"
            )
    if "1b_pipeline" in res:
        b = res["1b_pipeline"]
        print(f"\nmodel {b['model_mb']} MB, baseline RSS {b['baseline_rss_mb']} MB")
        print("| stage | peak RSS MB | (peak - baseline) / model |\n|---|---:|---:|")
        for k, v in b["stages"].items():
            print(f"| {k} | {v['peak_rss_mb']} | {v['over_baseline_in_models']} |")
    print(f"\nwritten {out_path}")


if __name__ == "__main__":
    main()
