"""Read a Hugging Face safetensors checkpoint tensor by tensor, across shards, never whole."""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import torch

from qexp.errors import ConfigError
from qexp.safetensors_io import DTYPES, SafetensorsError, read_header, tensor_entries

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A checkpoint directory (config.json + *.safetensors shards) or one .safetensors file.

    `get(name)` decodes a single tensor on demand, with positioned reads (`os.preadv`) on
    shard files kept open: threads may read concurrently. `view(name)` maps it instead (no
    copy out of the page cache), for readers that do not write to it.
    """

    def __init__(self, path: Path, key: str = "CHECKPOINT") -> None:
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            self.dir, shards = path.parent, [path]
        elif path.is_dir():
            self.dir = path
            index = path / INDEX
            if index.is_file():
                try:
                    wmap = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(key, str(index), "a JSON index with a weight_map") from None
                shards = [path / s for s in sorted(set(wmap.values()))]
            else:
                shards = sorted(path.glob("*.safetensors"))
        else:
            raise ConfigError(
                key, str(path), "an existing checkpoint directory or .safetensors file"
            )
        if not shards:
            raise ConfigError(key, str(path), "a checkpoint with *.safetensors weights")
        self.shards = shards
        self.entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for shard in shards:
            if not shard.is_file():
                raise ConfigError(key, str(shard), "a shard listed in the index that exists")
            header, base = read_header(shard)
            for name, entry in tensor_entries(header):
                if not isinstance(entry, dict) or "data_offsets" not in entry:
                    raise SafetensorsError(f"{shard}: malformed entry for {name}")
                self.entries[name] = (shard, base, entry)
        cfg = self.dir / "config.json"
        self.config: dict[str, Any] | None = json.loads(cfg.read_text()) if cfg.is_file() else None
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """Tensor names in shard and data order."""
        return list(self.entries)

    def shape(self, name: str) -> list[int]:
        """Shape of a tensor, from the header."""
        return list(self.entries[name][2]["shape"])

    def dtype(self, name: str) -> str:
        """safetensors dtype code of a tensor (e.g. F32, BF16)."""
        return str(self.entries[name][2]["dtype"])

    def _open(self, name: str) -> tuple[int, torch.dtype, int, int]:
        """fd of the tensor's shard, its torch dtype and its data's file offsets [start, end)."""
        shard, base, entry = self.entries[name]
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(shard, os.O_RDONLY)
        dtype = entry["dtype"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{shard}: tensor {name} has unsupported dtype {dtype}")
        start, end = entry["data_offsets"]
        return fd, DTYPES[dtype], base + start, base + end

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes into the page cache."""
        fd, _, start, end = self._open(name)
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)

    def view(self, name: str) -> torch.Tensor:
        """One tensor as a private mapping of its bytes (a write would copy the page, never
        reach the file), unmapped when the tensor is freed; `get` where it cannot be mapped
        (empty, or not aligned to its element size)."""
        fd, dtype, start, end = self._open(name)
        size = dtype.itemsize
        if end == start or start % size:
            return self.get(name)
        if end > os.fstat(fd).st_size:  # a mapping past the end faults (SIGBUS) when read
            raise SafetensorsError(f"{self.entries[name][0]}: truncated data of tensor {name}")
        page = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, end - page, offset=page, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(mm, dtype=dtype, count=(end - start) // size, offset=start - page)
        return flat.reshape(self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        """Decode one tensor."""
        shard, _, entry = self.entries[name]
        fd, dtype, start, end = self._open(name)
        buf = bytearray(end - start)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise SafetensorsError(f"{shard}: truncated data of tensor {name}")
            done += n
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for _, _, e in self.entries.values())

    def close(self) -> None:
        """Close the open shard files."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
