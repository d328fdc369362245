"""Memory: what a model needs before it is loaded, where it goes, and peak RSS per stage.

The pipeline holds one full model per branch plus scratch of about one module
(qexp/pipeline/run.py): `check_fits` refuses, from config.json alone, a model whose weights and
largest module do not fit the device; `device_map` places a model that fits one GPU on it and
one that needs several GPUs across them (`device_map="auto"`). `PeakRSS` measures a stage's
peak resident memory (Linux: the kernel's high-water mark VmHWM, reset per stage through
/proc/self/clear_refs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path
from typing import Any, Optional, Union

import torch

from qexp.core.errors import ConfigError
from qexp.core.geometry import config_getter, param_count

GIB = 1 << 30
M_ARENA_MAX = -8  # glibc's mallopt parameter


def weight_bytes(config: Any, dtype: torch.dtype) -> Optional[int]:
    """Bytes of the weights in `dtype`, from config.json (None: an unknown layout)."""
    n = param_count(config)
    return None if n is None else n * dtype.itemsize


def module_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the largest single module in float32 (scratch: a module cast for the
    probes' other dtype, or one layer of a stage's working copy), at least in `dtype`."""
    get = config_getter(config)
    h, vocab, inter = (get(k) or 0 for k in ("hidden_size", "vocab_size", "intermediate_size"))
    return max(vocab * h, 3 * h * inter) * max(4, dtype.itemsize)


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cgroup_room() -> Optional[int]:
    """Bytes left under this process's cgroup (v2) memory limit, if it has one."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available(device: torch.device) -> tuple[int, str]:
    """(bytes free for a model, where that number comes from) on `device`; for CUDA the
    free memory of that GPU, or of every GPU together for a bare `cuda`."""
    if device.type == "cuda":
        ids = [device.index] if device.index is not None else range(torch.cuda.device_count())
        free = sum(torch.cuda.mem_get_info(i)[0] for i in ids)
        return free, f"free memory of {len(ids)} GPU(s)"
    free = _meminfo().get("MemAvailable")
    room = _cgroup_room()
    if free is None and room is None:
        return 1 << 62, "unknown (no /proc/meminfo)"
    vals = [v for v in (free, room) if v is not None]
    return min(vals), "MemAvailable" if room is None or (free or 1 << 62) <= room else "cgroup"


def check_fits(config: Any, dtype: torch.dtype, device: torch.device, key: str, value: str) -> dict:
    """The memory plan of a model: raises ConfigError (naming `key`) when its weights and
    one module of scratch do not fit `device`; returns the estimate otherwise."""
    weights = weight_bytes(config, dtype)
    if weights is None:
        return {"weight_bytes": None}
    need = weights + module_bytes(config, dtype)
    free, source = available(device)
    plan = {
        "weight_bytes": weights,
        "needs_bytes": need,
        "available_bytes": free,
        "available_from": source,
    }
    if need > free:
        raise ConfigError(
            key,
            value,
            f"a model that fits {device}: in {str(dtype).removeprefix('torch.')} its weights "
            f"need {weights / GIB:.1f} GiB plus {(need - weights) / GIB:.1f} GiB of scratch, "
            f"{free / GIB:.1f} GiB are available ({source}); use a smaller dtype, a larger "
            "device or a smaller model",
        )
    return plan


def device_map(
    config: Any, dtype: torch.dtype, device: torch.device
) -> Optional[Union[str, dict[str, str]]]:
    """`from_pretrained`'s device_map: None on CPU (load there), the GPU itself when the
    weights fit it (no detour through host memory), "auto" when they need several GPUs."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    weights = weight_bytes(config, dtype) or 0
    single = torch.cuda.mem_get_info(index)[0]
    if weights + module_bytes(config, dtype) <= single or torch.cuda.device_count() < 2:
        return {"": f"cuda:{index}"}
    return "auto"


class PeakRSS:
    """Peak resident memory of this process between `reset()` and `peak_mb()`."""

    CLEAR = Path("/proc/self/clear_refs")
    STATUS = Path("/proc/self/status")

    def __init__(self) -> None:
        self.exact = self._clear()

    def _clear(self) -> bool:
        try:
            self.CLEAR.write_text("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    def reset(self) -> None:
        """Start a new window (where the kernel cannot reset, the peak since start)."""
        self.exact = self._clear()

    def _status(self, key: str) -> Optional[float]:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def peak_mb(self) -> float:
        """Peak RSS in MiB since the last reset."""
        hwm = self._status("VmHWM") if self.exact else None
        if hwm is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return hwm

    def now_mb(self) -> float:
        """Current RSS in MiB."""
        return self._status("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def trim_heap() -> bool:
    """Give the heap's free memory back to the kernel (glibc `malloc_trim`); call after
    dropping a large working set. False where there is no glibc."""
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


def share_malloc_arena() -> bool:
    """Make every thread allocate from one glibc malloc arena (`mallopt(M_ARENA_MAX, 1)`):
    with a thread per tensor, per-thread arenas keep each thread's freed tensors apart and
    resident memory grows with them (an 8B audit: 1.8 -> 1.4 GB peak at the same speed).
    False where there is no glibc (nothing changes)."""
    try:
        return bool(_libc().mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False
