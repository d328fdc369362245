"""Read a Hugging Face safetensors checkpoint tensor by tensor, across shards, never whole."""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qexp.checkpoint.safetensors_io import (
    DTYPES,
    SafetensorsError,
    read_header,
    read_tensor,
    tensor_entries,
)
from qexp.core.errors import ConfigError

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A checkpoint directory (config.json + *.safetensors shards) or one .safetensors file.

    `get(name)` decodes a single tensor on demand, with positioned reads on shard files kept
    open: threads may read concurrently. `view(name)` maps it instead (no
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
        self._files: dict[Path, BinaryIO] = {}
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

    def _file(self, name: str) -> tuple[BinaryIO, int, dict[str, Any]]:
        """The open shard file of a tensor, its data section's offset and its entry."""
        shard, base, entry = self.entries[name]
        with self._lock:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = open(shard, "rb")  # noqa: SIM115 (closed in close())
        return f, base, entry

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes into the page cache."""
        f, base, entry = self._file(name)
        start, end = entry["data_offsets"]
        os.posix_fadvise(f.fileno(), base + start, end - start, os.POSIX_FADV_WILLNEED)

    def view(self, name: str) -> torch.Tensor:
        """One tensor as a private mapping of its bytes (a write would copy the page, never
        reach the file), unmapped when the tensor is freed; `get` where it cannot be mapped
        (empty, not aligned to its element size, or a dtype `get` refuses)."""
        f, base, entry = self._file(name)
        dtype = DTYPES.get(entry["dtype"])
        start, end = (base + o for o in entry["data_offsets"])
        if dtype is None or end == start or start % dtype.itemsize:
            return self.get(name)
        if end > os.fstat(f.fileno()).st_size:  # a mapping past the end faults when read
            raise SafetensorsError(f"{f.name}: truncated data of tensor {name}")
        page = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(f.fileno(), end - page, offset=page, access=mmap.ACCESS_COPY)
        count = (end - start) // dtype.itemsize
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=start - page).reshape(
            entry["shape"]
        )

    def get(self, name: str) -> torch.Tensor:
        """Decode one tensor."""
        return read_tensor(*self._file(name), name)

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for _, _, e in self.entries.values())

    def close(self) -> None:
        """Close the open shard files."""
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
