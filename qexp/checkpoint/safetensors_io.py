"""Streaming safetensors: read one tensor at a time, write a file tensor by tensor.

Plain reads (no mmap), so resident memory stays at about one tensor; untouched tensors are
copied in chunks without being decoded. The header and tensor order of the input are kept,
so an unchanged tensor is byte-identical in the output.
"""

from __future__ import annotations

import errno
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qexp.core.io import atomic_open

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,  # FP8 serving formats (compressed-tensors, HF fine-grained)
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100_000_000  # bytes; safetensors' own loader refuses larger headers
CODES = {v: k for k, v in DTYPES.items()}
CHUNK = 64 << 20


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file."""


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, byte offset of the data section) of a file that follows the format's rules:
    a JSON object header of at most MAX_HEADER bytes, string metadata, and for each tensor a
    known dtype, a shape of non-negative integers and `data_offsets` whose length is shape ×
    dtype, the tensors' byte ranges covering the data section exactly, without overlap or gap
    (a truncated file is refused naming its first missing tensor). Every problem is one
    SafetensorsError naming the file, the tensor and the rule."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: header of {n} bytes does not fit a file of {size} bytes"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(f"{path}: __metadata__ is not a map of strings")
    data = size - 8 - n
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = _check_entry(path, name, entry)
        ranges.append((start, end, name))
    pos = 0
    for start, end, name in sorted(ranges):
        if start != pos:
            what = (
                "overlaps the tensor before it"
                if start < pos
                else f"leaves bytes {pos}..{start} unused"
            )
            raise SafetensorsError(f"{path}: tensor {name} at bytes {start}..{end} {what}")
        if end > data:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name} ends at byte {8 + n + end}, the file has "
                f"{size} bytes"
            )
        pos = end
    if pos != data:
        raise SafetensorsError(
            f"{path}: {data - pos} bytes after the last tensor (no tensor holds them)"
        )
    return header, 8 + n


def _check_entry(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """One tensor entry's byte range, after checking its dtype, shape and size."""
    try:
        dtype, shape = entry["dtype"], entry["shape"]
        start, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name} has a malformed header entry") from None
    if dtype not in DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name} has unsupported dtype {dtype} (known: {', '.join(DTYPES)})"
        )
    ints = [shape] if not isinstance(shape, list) else shape
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in ints):
        raise SafetensorsError(f"{path}: tensor {name} has shape {shape}, not a list of sizes")
    if type(start) is not int or type(end) is not int:
        raise SafetensorsError(f"{path}: tensor {name} has non-integer data_offsets")
    want = DTYPES[dtype].itemsize * math.prod(shape)
    if not 0 <= start <= end or end - start != want:
        raise SafetensorsError(
            f"{path}: tensor {name} spans bytes {start}..{end}, its shape {shape} {dtype} "
            f"needs {want}"
        )
    return start, end


def tensor_entries(header: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Tensor entries in data order (metadata excluded)."""
    items = [(k, v) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    return sorted(items, key=lambda kv: kv[1].get("data_offsets", [0])[0])


def read_tensor(f: BinaryIO, base: int, entry: dict[str, Any], name: str = "") -> torch.Tensor:
    """Decode one tensor from an open file, with positioned reads (`os.preadv`, no seek:
    threads may share `f`)."""
    if entry["dtype"] not in DTYPES:
        raise SafetensorsError(f"{f.name}: tensor {name} has unsupported dtype {entry['dtype']}")
    start, end = entry["data_offsets"]
    buf = bytearray(end - start)
    view, done = memoryview(buf), 0
    while done < len(buf):
        n = os.preadv(f.fileno(), [view[done:]], base + start + done)
        if n <= 0:
            raise SafetensorsError(f"{f.name}: truncated data of tensor {name}")
        done += n
    if not buf:
        return torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
    return torch.frombuffer(buf, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a file, one at a time."""
    header, base = read_header(path)
    with open(path, "rb") as f:
        for name, entry in tensor_entries(header):
            yield name, read_tensor(f, base, entry, name)


def write_streaming(
    dst: Path,
    entries: list[tuple[str, str, list[int]]],
    body: Callable[[BinaryIO], None],
    metadata: dict[str, str] | None = None,
) -> None:
    """Atomically write a safetensors file whose tensor bytes `body(file)` writes in order.

    `entries` are (name, dtype code, shape) in data order; offsets follow from them.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, code, shape in entries:
        size = DTYPES[code].itemsize * math.prod(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        body(out)
        if out.tell() != 8 + len(blob) + pos:
            raise SafetensorsError(
                f"{dst}: wrote {out.tell()} bytes, header says {8 + len(blob) + pos}"
            )


def write_tensor(out: BinaryIO, t: torch.Tensor) -> None:
    """Append a tensor's raw bytes."""
    if t.numel():
        out.write(memoryview(t.contiguous().view(torch.uint8).numpy()))


class _Range:
    """Bytes of `src` copied unchanged: in the kernel (`os.copy_file_range`, as `cp` does)
    where the system allows it, else in CHUNK reads."""

    def __init__(self, offset: int, length: int, name: str) -> None:
        self.offset, self.length, self.name = offset, length, name

    def copy(self, f: BinaryIO, out: BinaryIO) -> None:
        out.flush()
        offset, left = self.offset, self.length
        while left and (n := self._kernel_copy(f, out, offset, left)):
            offset, left = offset + n, left - n
        f.seek(offset)
        while left:  # no copy_file_range here (or it stopped): through memory
            chunk = f.read(min(CHUNK, left))
            if not chunk:  # the file shrank while being read
                raise SafetensorsError(f"{f.name}: truncated data of tensor {self.name}")
            out.write(chunk)
            left -= len(chunk)

    @staticmethod
    def _kernel_copy(f: BinaryIO, out: BinaryIO, offset: int, left: int) -> int:
        """Bytes copied by one copy_file_range (0: not available, or end of file)."""
        try:
            return os.copy_file_range(f.fileno(), out.fileno(), left, offset)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                return 0
            raise


class _Stage:
    """A thread that moves items between bounded queues; any error stops the pipeline."""

    DONE = object()

    def __init__(self, stop: threading.Event) -> None:
        self.stop, self.error = stop, None

    def put(self, q: queue.Queue, item: Any) -> bool:
        """Put unless the pipeline stopped (False then)."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue) -> Any:
        """The next item, or DONE once the pipeline stopped."""
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return self.DONE

    def run(self, work: Callable[[], None]) -> threading.Thread:
        def guarded() -> None:
            try:
                work()
            except BaseException as e:  # re-raised in the calling thread
                self.error = e
                self.stop.set()

        t = threading.Thread(target=guarded, daemon=True)
        t.start()
        return t


def stream_transform(
    src: Path,
    dst: Path,
    fn: Callable[[str, torch.Tensor | None], torch.Tensor | None],
    wants: Callable[[str], bool],
    metadata: dict[str, str] | None = None,
    reads: Callable[[str], bool] | None = None,
) -> int:
    """Write `dst` with the tensors of `src` for which `wants(name)` passed through `fn`.

    `fn` returns a tensor of the same dtype and shape, or None to keep the tensor; other
    tensors are copied as bytes without being decoded (in the kernel where it can). `fn` gets
    the tensor read
    from `src`, or None where `reads(name)` is false (it reads what it needs itself). Reading,
    `fn` and writing run in three threads joined by short queues, so the disk reads, the
    arithmetic and the disk writes overlap (file I/O and torch release the GIL). Returns the
    number of tensors changed.
    """
    header, base = read_header(src)
    entries = tensor_entries(header)
    meta = dict(header.get("__metadata__") or {})
    meta.update(metadata or {})
    reads = reads or wants
    changed = 0

    def body(out: BinaryIO, f: BinaryIO) -> None:
        nonlocal changed
        stop = threading.Event()
        stage = _Stage(stop)
        q_in: queue.Queue = queue.Queue(maxsize=2)
        q_out: queue.Queue = queue.Queue(maxsize=2)

        def read_all() -> None:
            for name, entry in entries:
                if wants(name):
                    t = read_tensor(f, base, entry, name) if reads(name) else None
                    if not stage.put(q_in, (name, entry, t)):
                        return
                    continue
                start, end = entry["data_offsets"]
                if not stage.put(q_in, _Range(base + start, end - start, name)):
                    return
            stage.put(q_in, stage.DONE)

        def write_all() -> None:
            while (item := stage.get(q_out)) is not stage.DONE:
                if isinstance(item, torch.Tensor):
                    write_tensor(out, item)
                else:
                    item.copy(f, out)  # the only user of f's position

        threads = [stage.run(read_all), stage.run(write_all)]
        try:
            while (item := stage.get(q_in)) is not stage.DONE:
                if isinstance(item, _Range):
                    stage.put(q_out, item)
                    continue
                name, entry, t = item
                new = fn(name, t)
                if new is None:
                    new = t if t is not None else read_tensor(f, base, entry, name)
                elif new.dtype != DTYPES[entry["dtype"]] or list(new.shape) != entry["shape"]:
                    raise SafetensorsError(f"transform changed dtype/shape of {name}")
                else:
                    changed += 1
                stage.put(q_out, new)
            stage.put(q_out, stage.DONE)
            threads[1].join()
        finally:
            stop.set()
            for t in threads:
                t.join()
        if stage.error is not None:
            raise stage.error

    def write(out: BinaryIO) -> None:
        with open(src, "rb") as f:  # shared: tensors are read with positioned reads
            body(out, f)

    write_streaming(dst, [(n, e["dtype"], e["shape"]) for n, e in entries], write, meta)
    return changed
