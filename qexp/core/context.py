"""The small run context passed to every stage (no global state)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexp.core.cache import StageCache


@dataclass
class RunContext:
    """Seed, device, dtype, cache and output locations shared by the stages of one job."""

    seed: int
    device: torch.device
    dtype: torch.dtype
    cache_dir: Path
    run_dir: Path
    stages: StageCache  # the stage cache (mode on | off | refresh), also for sub-steps
    progress: bool = True
    save_quantized: bool = False
    save_attacked: bool = False
    cache_weights: tuple[str, ...] = ("attack", "quantize")

    @classmethod
    def from_schema(cls, run: Any, run_dir: Path) -> RunContext:
        """From a run's top-level settings (qexp.pipeline.spec.RunSchema): resolve `auto`
        device and dtype names and set torch's thread count."""
        torch.set_num_threads(run.threads or default_threads())
        if run.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(run.device)
        cache_dir = Path(os.path.expanduser(run.cache_dir))
        return cls(
            seed=run.seed,
            device=device,
            dtype=getattr(torch, run.dtype),
            cache_dir=cache_dir,
            run_dir=Path(run_dir),
            stages=StageCache(cache_dir / "stages", run.cache),
            progress=run.progress,
            save_quantized=run.save_quantized,
            save_attacked=run.save_attacked,
            cache_weights=tuple(run.cache_weights),
        )

    def seed_everything(self, offset: int = 0) -> torch.Generator:
        """Seed python, numpy and torch; return a CPU generator seeded the same way."""
        s = self.seed + offset
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        return torch.Generator().manual_seed(s)


def default_threads() -> int:
    """torch threads when `threads` is null: OMP_NUM_THREADS if set, else every core."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else available_cores()


def available_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
