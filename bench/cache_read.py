"""What does reading a stage-cache entry cost beyond reading its bytes?

A cache entry of `--gib` GiB of tensors (an 8B model in bf16 is ~16 GB; the cost is linear
in bytes, so a few GiB give the same ratios) is written with qexp's StageCache. Then, with
the file evicted from the page cache before each step (cold: the disk) and again with it
cached (warm: memory bandwidth), the bench times:
- `read`: the entry's blob read once in 16 MiB chunks (the baseline: the bytes themselves);
- `get`: `StageCache.get` (meta.json, size check, xxh3-128 of every blob: the verification);
- `get_sha256`: the same verification with sha256 (the digest the cache used before);
- `get_load`: `get` then the tensors loaded (what a cache hit costs in all).
Ratios are against `read` of the same run.

    python bench/cache_read.py [--gib 4] [--dir /tmp] [--out bench/results/cache_read.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qexp.core.cache import TENSORS_BLOB, StageCache, digest
from qexp.core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16 << 20


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (the next read comes from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes(path: Path) -> int:
    buf = bytearray(CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache_read.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qexp-cache-bench-", dir=args.dir))
    try:
        cache, key = StageCache(work), digest("bench", args.gib)
        n = int(args.gib * (1 << 30) / 2 / 64)  # bf16 elements in each of 64 tensors
        gen = torch.Generator().manual_seed(0)
        tensors = {
            f"w{i}": torch.randn(n // 1024, 1024, generator=gen).to(torch.bfloat16)
            for i in range(64)
        }
        with cache.lock("quantize", key):
            cache.put("quantize", key, {"info": {}}, tensors=tensors)
        del tensors
        blob = work / "quantize" / key / TENSORS_BLOB
        size = blob.stat().st_size

        def get() -> None:
            assert cache.get("quantize", key) is not None

        def get_load() -> None:
            entry = cache.get("quantize", key)
            assert sum(t.numel() for t in entry.tensors().values()) > 0

        steps = {
            "read": lambda: read_bytes(blob),
            "get": get,
            "get_sha256": lambda: sha256(blob),
            "get_load": get_load,
        }
        out: dict = {"bytes": size, "cold": {}, "warm": {}}
        for mode in ("cold", "warm"):
            for name, fn in steps.items():
                times = []
                for _ in range(args.repeats):
                    if mode == "cold":
                        evict(blob)
                    else:
                        read_bytes(blob)
                    times.append(timed(fn))
                out[mode][name] = min(times)
            base = out[mode]["read"]
            out[mode]["ratios"] = {
                k: round(v / base, 3) for k, v in out[mode].items() if k != "read"
            }
            out[mode]["read_gb_s"] = round(size / base / 1e9, 2)
        out["machine"] = {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        }
        atomic_write_json(args.out, out)
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
