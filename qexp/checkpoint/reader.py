"""The one reader of untrusted checkpoints: a Hugging Face safetensors directory, validated
before anything reads a weight, then read tensor by tensor, across shards, never whole.

Every tool (qexp-audit, qexp-encrypt, qexp-canonicalize) and the pipeline's weight-free model
check open a checkpoint here. The rules, each broken one reported as one line naming the
file, the tensor and the rule (SafetensorsError, exit 2 in the tools):

- shard names (the index's, or the directory's *.safetensors) are plain file names inside
  the directory: no separators, no `..`, not absolute; a symlink that leaves the directory
  is refused unless the caller allows it (`--allow-symlinks`), but for a Hugging Face cache
  snapshot's links into its own `blobs/`;
- with an index, the shards on disk are exactly the index's, every tensor the index names is
  in the shard it names, and every tensor of a shard is in the index; a tensor name appears
  in one shard only;
- each shard follows the safetensors format (safetensors_io.read_header: dtypes, shapes,
  byte ranges covering the data section without overlap or gap);
- config.json, when present, is a JSON object, and every tensor of the standard decoder
  layout has the shape it implies (core/geometry.expected_shape).
"""

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
from qexp.core.geometry import bad_size, expected_shape

INDEX = "model.safetensors.index.json"
SUFFIX = ".safetensors"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# the scale tensors FP8 checkpoints store beside a weight: compressed-tensors' `weight_scale`
# (per tensor or per output channel, multiplied) and the fine-grained (DeepSeek / transformers
# FineGrainedFP8) `weight_scale_inv` (one per block of rows x columns, multiplied as well)
SCALES = ("weight_scale", "weight_scale_inv")


def read_config(path: Path) -> dict[str, Any] | None:
    """config.json of a checkpoint directory as a JSON object (None when there is none)."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise SafetensorsError(f"{path}: not a JSON object")
    bad = bad_size(config)
    if bad is not None:
        raise SafetensorsError(f"{path}: {bad[0]} = {bad[1]!r} is not a positive integer")
    return config


def shard_path(root: Path, name: Any, where: str, allow_symlinks: bool) -> Path:
    """`root / name` for a shard name that is a plain *.safetensors file name inside `root`
    (a symlink that leaves `root` only when allowed)."""
    plain = (
        isinstance(name, str)
        and name == Path(name).name
        and name not in ("", ".", "..")
        and "\\" not in name
        and "\x00" not in name
        and name.endswith(SUFFIX)
    )
    if not plain:
        raise SafetensorsError(
            f"{where}: shard {name!r} is not a plain *.safetensors file name inside the directory"
        )
    path = root / name
    if path.is_symlink() and not allow_symlinks:
        target = path.resolve()
        inside = [root.resolve()]
        if root.parent.name == "snapshots":  # a Hugging Face cache snapshot: links to its blobs
            inside.append((root.parent.parent / "blobs").resolve())
        if not any(r in target.parents for r in inside):
            raise SafetensorsError(
                f"{path}: a symlink leaving the directory (to {target}); pass --allow-symlinks "
                "to read it"
            )
    if not path.is_file():
        raise SafetensorsError(f"{where}: shard {name} does not exist")
    return path


def _expand_scale(s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A scale broadcast to a weight of `shape`: one per tensor, one per output row ([out] or
    [out, 1]), or one per block of a 2-D weight ([ceil(out/bh), ceil(in/bw)]); None when its
    shape is none of these."""
    if s.numel() == 1:
        return s.reshape(())
    if len(shape) != 2:
        return None
    out, cols = shape
    if s.numel() == out and s.shape[0] == out:
        return s.reshape(out, 1)
    if s.dim() != 2 or not (0 < s.shape[0] <= out and 0 < s.shape[1] <= cols):
        return None
    bh, bw = -(-out // s.shape[0]), -(-cols // s.shape[1])
    if -(-out // bh) != s.shape[0] or -(-cols // bw) != s.shape[1]:
        return None
    return s.repeat_interleave(bh, 0)[:out].repeat_interleave(bw, 1)[:, :cols]


class Checkpoint:
    """A checkpoint directory (config.json + *.safetensors shards) or one .safetensors file,
    validated on opening (this module's rules).

    `get(name)` decodes a single tensor on demand, with positioned reads on shard files kept
    open: threads may read concurrently. `view(name)` maps it instead (no copy out of the
    page cache), for readers that do not write to it.
    """

    def __init__(self, path: Path, key: str = "CHECKPOINT", allow_symlinks: bool = False) -> None:
        path = Path(path)
        self.index: dict[str, str] | None = None
        if path.is_file() and path.suffix == SUFFIX:
            self.dir, shards = path.parent, [path]
        elif path.is_dir():
            self.dir = path
            shards = self._shards(path, allow_symlinks)
        else:
            raise ConfigError(
                key, str(path), "an existing checkpoint directory or .safetensors file"
            )
        if not shards:
            raise ConfigError(key, str(path), "a checkpoint with *.safetensors weights")
        self.shards = shards
        self.entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for shard in shards:
            header, base = read_header(shard)
            for name, entry in tensor_entries(header):
                self._add(shard, base, name, entry)
        if self.index is not None:
            missing = sorted(set(self.index) - set(self.entries))
            if missing:
                raise SafetensorsError(
                    f"{self.dir / self.index[missing[0]]}: tensor {missing[0]} is in the index "
                    f"but not in this shard ({len(missing)} such tensors)"
                )
        self.config = read_config(self.dir / "config.json")
        if self.config is not None:
            self.check_shapes(self.names)
        self._files: dict[Path, BinaryIO] = {}
        self._lock = threading.Lock()

    def _shards(self, root: Path, allow_symlinks: bool) -> list[Path]:
        """The shards of a directory: the index's (which must be all of them), or every
        *.safetensors file without an index."""
        on_disk = sorted(p.name for p in root.glob("*" + SUFFIX))
        if not (root / INDEX).exists():
            return [shard_path(root, n, str(root), allow_symlinks) for n in on_disk]
        self.index = self._read_index(root / INDEX)
        listed = sorted(set(self.index.values()))
        extra = sorted(set(on_disk) - set(listed))
        if extra:
            raise SafetensorsError(f"{root / extra[0]}: a shard the index ({INDEX}) does not list")
        return [shard_path(root, n, str(root / INDEX), allow_symlinks) for n in listed]

    @staticmethod
    def _read_index(path: Path) -> dict[str, str]:
        try:
            wmap = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError):
            raise SafetensorsError(f"{path}: not a JSON index with a weight_map") from None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise SafetensorsError(f"{path}: weight_map is not a map of tensor -> shard file")
        return wmap

    def _add(self, shard: Path, base: int, name: str, entry: dict[str, Any]) -> None:
        if name in self.entries:
            raise SafetensorsError(
                f"{shard}: tensor {name} is also in {self.entries[name][0].name} (a tensor "
                "belongs to one shard)"
            )
        if self.index is not None and self.index.get(name) != shard.name:
            listed = self.index.get(name)
            why = f"the index puts it in {listed}" if listed else "the index does not list it"
            raise SafetensorsError(f"{shard}: tensor {name}: {why}")
        self.entries[name] = (shard, base, entry)

    def check_shapes(self, names: list[str]) -> None:
        """Each tensor of the standard decoder layout among `names` has the shape config.json
        implies (a zero-size embedding, a cut layer and a layer the config lacks fail)."""
        for name in names:
            want = expected_shape(name, self.config)
            if want is None:
                continue
            got = self.shape(name)
            if got != want:
                rule = f"config.json implies {want}" if want else "config.json has no such layer"
                raise SafetensorsError(
                    f"{self.entries[name][0]}: tensor {name} has shape {got}; {rule}"
                )

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

    def scale_of(self, name: str) -> str | None:
        """The scale tensor stored beside an FP8 weight `name`, if any."""
        if not name.endswith("weight"):
            return None
        stem = name[: -len("weight")]
        return next((stem + s for s in SCALES if stem + s in self.entries), None)

    def weight(self, name: str) -> tuple[torch.Tensor | None, str]:
        """A tensor as the real values it stands for, and how it was read:

        - a floating-point tensor as stored (`as stored`);
        - an FP8 weight times the scale stored beside it (`fp8 x scale`: one per tensor, per
          output row or per block) or as stored when there is none (`fp8 unscaled`);
        - an int8 weight times its scale (`int8 x scale`, symmetric: no zero point stored);
        - None for anything else (`not interpreted: ...`): other integer or packed weights,
          an int8 weight with a zero point or without a scale.

        SafetensorsError for a scale whose shape fits none of the layouts above."""
        w = self.view(name)
        if w.is_floating_point() and w.dtype not in FP8:
            return w, "as stored"
        scale = self.scale_of(name)
        stem = name[: -len("weight")] if name.endswith("weight") else None
        if w.dtype in FP8 and scale is None:
            return w.float(), "fp8 unscaled"
        if w.dtype not in (*FP8, torch.int8):
            return None, f"not interpreted: {self.dtype(name)} values (integer or packed)"
        if scale is None:
            return None, "not interpreted: int8 without a scale"
        if stem is not None and stem + "weight_zero_point" in self.entries:
            return None, "not interpreted: integer weight with a zero point"
        s = self.get(scale).float()
        full = _expand_scale(s, tuple(w.shape))
        if full is None:
            raise SafetensorsError(
                f"{self.entries[scale][0]}: tensor {scale} has shape {list(s.shape)}, which "
                f"fits neither a tensor, a row nor a block scale of {name} {list(w.shape)}"
            )
        kind = "fp8" if w.dtype in FP8 else "int8"
        return w.float() * full, f"{kind} x scale"

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
