"""Read a Hugging Face safetensors checkpoint tensor by tensor, across shards, never whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qexp.errors import ConfigError
from qexp.safetensors_io import SafetensorsError, read_header, read_tensor, tensor_entries

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A checkpoint directory (config.json + *.safetensors shards) or one .safetensors file.

    `get(name)` decodes a single tensor on demand; open shard files are kept so that reading
    a layer's tensors costs one seek each.
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

    def get(self, name: str) -> torch.Tensor:
        """Decode one tensor."""
        shard, base, entry = self.entries[name]
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(shard, "rb")  # noqa: SIM115 (closed in close())
        return read_tensor(f, base, entry, name)

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for _, _, e in self.entries.values())

    def close(self) -> None:
        """Close the open shard files."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
