"""One streamed pass over a checkpoint for every static check, tensors in parallel.

Each check declares the tensors it reads (`tensors`), reduces one tensor to a small partial
result (`visit`, run in a worker thread: torch releases the GIL inside its kernels) and turns
the partials into its report (`finish`); each report gets the CPU seconds its visits took
(`cpu_s`). Every tensor is read once, whatever the number of checks, by one reader thread
that keeps one tensor ahead of the `jobs` workers; at most `jobs` + 1 tensors (plus the
checks' chunked scratch) are in memory at a time.

Tensors are read as the values they stand for (`Checkpoint.weight`: FP8 and int8 weights
times their scales); what cannot be interpreted is skipped and named. Every floating-point
tensor is also counted for NaN and infinite values: such a tensor is a finding of its own
(the `finite` check) and the other checks see it with those values set to 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from qexp.checkpoint.reader import Checkpoint
from qexp.core.memory import trim_heap


class Check(Protocol):
    """A static check of `qexp-audit`."""

    name: str

    def tensors(self, ckpt: Checkpoint) -> list[str]:
        """The tensors it reads."""

    def visit(self, name: str, w: torch.Tensor) -> Any:
        """A small partial result for one tensor (thread-safe)."""

    def finish(self, parts: dict[str, Any]) -> dict[str, Any]:
        """The check's report from every tensor's partial result."""


def _ordered(futures: Iterator[tuple[str, Future]], window: int) -> Iterator[tuple[str, Any]]:
    """Results in submission order with at most `window` futures pending."""
    pending: list[tuple[str, Future]] = []
    for item in futures:
        pending.append(item)
        if len(pending) >= window:
            name, f = pending.pop(0)
            yield name, f.result()
    for name, f in pending:
        yield name, f.result()


FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def nonfinite(w: torch.Tensor) -> int:
    """NaN and infinite values of a tensor (a float64 sum first: finite for finite weights,
    so the exact count runs only for a tensor that has some)."""
    if not w.is_floating_point() or bool(torch.isfinite(w.sum(dtype=torch.float64))):
        return 0
    return int((~torch.isfinite(w)).sum())


def finite_report(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The `finite` check: tensors with NaN or infinite values, and how each was read."""
    bad = {n: p["nonfinite"] for n, p in parts.items() if p.get("nonfinite")}
    how: dict[str, int] = {}
    for p in parts.values():
        how[p["read"]] = how.get(p["read"], 0) + 1
    skipped = sorted(n for n, p in parts.items() if p["read"].startswith("not interpreted"))
    return {
        "verdict": "suspicious" if bad else "clean",
        "tensors": len(parts),
        "nonfinite": dict(sorted(bad.items(), key=lambda kv: -kv[1])),
        "read_as": dict(sorted(how.items())),
        "not_interpreted": skipped,
    }


def scan(
    ckpt: Checkpoint, checks: list[Check], jobs: int = 1, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Every check's report, and the `finite` check's, from one pass over the tensors any
    of them reads (and every floating-point tensor)."""
    wanted = {c.name: set(c.tensors(ckpt)) for c in checks}
    names = [
        n for n in ckpt.names if ckpt.dtype(n) in FLOATS or any(n in w for w in wanted.values())
    ]
    parts: dict[str, dict[str, Any]] = {c.name: {} for c in checks}
    parts["finite"] = {}

    cpu = {"finite": 0.0, **{c.name: 0.0 for c in checks}}

    def work(name: str, prefetched: Future) -> dict[str, Any]:
        prefetched.result()
        w, how = ckpt.weight(name)
        out: dict[str, Any] = {"finite": {"read": how}}
        if w is None:
            return out
        now = time.thread_time()
        bad = nonfinite(w)
        if bad:
            out["finite"]["nonfinite"] = bad
            w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        cpu["finite"], now = cpu["finite"] + time.thread_time() - now, time.thread_time()
        for c in checks:
            if name in wanted[c.name]:
                out[c.name] = c.visit(name, w)
                cpu[c.name], now = cpu[c.name] + time.thread_time() - now, time.thread_time()
        del w
        trim_heap()  # the tensor and its scratch go back to the kernel, not to a heap
        return out

    workers = max(1, jobs)
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-read") as io,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audit") as pool,
    ):
        # the kernel reads one tensor ahead of the workers: the disk and the cores busy at once
        submitted = ((n, pool.submit(work, n, io.submit(ckpt.prefetch, n))) for n in names)
        bar = tqdm(total=len(names), desc="audit", disable=not progress, unit="tensor")
        for name, result in _ordered(submitted, workers + 1):
            for check, part in result.items():
                parts[check][name] = part
            bar.update()
        bar.close()
    reports = {c.name: c.finish(parts[c.name]) for c in checks}
    for c in checks:
        reports[c.name]["cpu_s"] = round(cpu[c.name], 1)
    reports["finite"] = {**finite_report(parts["finite"]), "cpu_s": round(cpu["finite"], 1)}
    return reports
