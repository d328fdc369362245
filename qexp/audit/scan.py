"""One streamed pass over a checkpoint for every static check, tensors in parallel.

Each check declares the tensors it reads (`tensors`), reduces one tensor to a small partial
result (`visit`, run in a worker thread: torch releases the GIL inside its kernels) and turns
the partials into its report (`finish`); each report gets the CPU seconds its visits took
(`cpu_s`). Every tensor is read once, whatever the number of checks, by one reader thread
that keeps one tensor ahead of the `jobs` workers; at most `jobs` + 1 tensors (plus the
checks' chunked scratch) are in memory at a time.
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


def scan(
    ckpt: Checkpoint, checks: list[Check], jobs: int = 1, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Every check's report, from one pass over the tensors any of them reads."""
    wanted = {c.name: set(c.tensors(ckpt)) for c in checks}
    names = [n for n in ckpt.names if any(n in w for w in wanted.values())]
    parts: dict[str, dict[str, Any]] = {c.name: {} for c in checks}

    cpu = {c.name: 0.0 for c in checks}

    def work(name: str, prefetched: Future) -> dict[str, Any]:
        prefetched.result()
        w, out, now = ckpt.view(name), {}, time.thread_time()
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
    return reports
