"""Streaming encryption: time vs. a plain read+write copy, and peak RSS on a 1B checkpoint.

1. The embedded model's converted checkpoint (fp32): encrypt_checkpoint (what
   `python -m qexp.tools.encrypt` runs) vs. a byte copy through the same streaming writer (atomic,
   fsync) and `shutil.copyfile`; in-process, interleaved, median of --repeats. Goal <= 1.5x.
2. A synthetic Llama-3.2-1B-shaped checkpoint (bf16, random, bench/synthetic.py) encrypted
   in a child process; its peak RSS (goal < 1.5 GB) against the peak RSS of a child that
   only imports qexp.tools.encrypt. (The 8B table, with canonicalize and the audit: bench/scale.py.)

    python bench/encrypt.py [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from synthetic import write_checkpoint

from qexp.checkpoint.safetensors_io import stream_transform
from qexp.core.io import atomic_write_json
from qexp.tools.encrypt import encrypt_checkpoint, load_attack

ROOT = Path(__file__).resolve().parents[1]


def child_peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process (a fresh process each time)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    return float(out[0]), float(out[1])


def embedded_checkpoint() -> Path:
    """The converted embedded model (converting it on first use)."""
    from hydra import compose, initialize_config_dir

    from qexp.core.context import RunContext
    from qexp.pipeline.spec import validate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        spec = validate(compose("config", overrides=["logger=none"]))
    return spec.model.checkpoint_dir(RunContext.from_schema(spec.run, ROOT / "bench"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encrypt.json")
    a = p.parse_args()
    res: dict = {}
    src = embedded_checkpoint()
    shard = src / "model.safetensors"
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as tmp:
        tmp = Path(tmp)
        attack = load_attack([])
        times: dict[str, list[float]] = {"plain": [], "stream": [], "encrypt": []}
        for i in range(a.repeats):  # interleaved, median of each
            t0 = time.perf_counter()
            shutil.copyfile(shard, tmp / f"copy{i}.safetensors")
            times["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stream_transform(
                shard, tmp / f"stream{i}.safetensors", lambda n, t: None, lambda n: False
            )
            times["stream"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            encrypt_checkpoint(src, tmp / f"enc{i}", attack, progress=False)
            times["encrypt"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        _, rss_enc = child_peak_rss_mb(
            [
                sys.executable,
                "-m",
                "qexp.tools.encrypt",
                str(src),
                str(tmp / "enc_child"),
                "--no-progress",
            ]
        )
        _, rss_imp = child_peak_rss_mb([sys.executable, "-c", "import qexp.tools.encrypt"])
        res["embedded"] = {
            "checkpoint_mb": round(shard.stat().st_size / 2**20, 1),
            "repeats": a.repeats,
            "plain_copy_s": round(med["plain"], 3),
            "stream_copy_s": round(med["stream"], 3),
            "encrypt_s": round(med["encrypt"], 3),
            "ratio_encrypt_vs_stream_copy": round(med["encrypt"] / med["stream"], 2),
            "ratio_encrypt_vs_plain_copy": round(med["encrypt"] / med["plain"], 2),
            "peak_rss_mb": round(rss_enc, 1),
            "goal_ratio": 1.5,
        }
        if not a.skip_synthetic:
            syn = tmp / "synthetic"
            t0 = time.perf_counter()
            n = write_checkpoint(syn, "llama3_1b")["params"]
            t_gen = time.perf_counter() - t0
            t_syn, rss_syn = child_peak_rss_mb(
                [
                    sys.executable,
                    "-m",
                    "qexp.tools.encrypt",
                    str(syn),
                    str(tmp / "syn_enc"),
                    "--no-progress",
                ]
            )
            res["synthetic"] = {
                "params": n,
                "checkpoint_gb": round(
                    sum(f.stat().st_size for f in syn.glob("*.safetensors")) / 2**30, 2
                ),
                "generate_s": round(t_gen, 1),
                "encrypt_s_incl_startup": round(t_syn, 1),
                "peak_rss_mb": round(rss_syn, 1),
                "import_only_peak_rss_mb": round(rss_imp, 1),
                "goal_peak_rss_mb": 1536,
            }
    res["threads"] = torch.get_num_threads()
    res["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(res, indent=2))
    atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
