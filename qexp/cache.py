"""Stage cache: every stage's output stored under a content hash of what determines it.

Keys chain from the loaded model (model config, its files' fingerprint, dtype, device and the
library versions) through each stage (stage config + upstream key + seed), so a sweep over
σ re-uses M, A(M) and `original`'s generations instead of recomputing them. An entry is
`cache_dir/stages/<stage>/<key>/`: `meta.json` (the stage's side results and files) and, for
stages whose output is a plain model, `model.safetensors`. Entries are written into a temp
dir and renamed into place (atomic); an flock on `<key>.lock` makes concurrent jobs that need
the same entry compute it once. `cache=off` neither reads nor writes; `cache=refresh`
recomputes and overwrites.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from safetensors.torch import load_model, save_model
from torch import nn

from qexp.io import atomic_open, atomic_write_json

CACHE_MODES = ("on", "off", "refresh")
VERSION = 1
LIBRARIES = (
    "qexp",
    "torch",
    "transformers",
    "bitsandbytes",
    "gptqmodel",
    "llmcompressor",
    "compressed-tensors",
    "gguf",
    "lm_eval",
)
# files a stage may rewrite that are not its output
NOT_STAGE_FILES = ("results.json", ".hydra/")


def digest(*parts: Any) -> str:
    """A short sha256 of JSON-serialisable parts (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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
    """A complete cache entry."""

    path: Path
    meta: dict

    @property
    def has_model(self) -> bool:
        return (self.path / "model.safetensors").is_file()

    def load_into(self, model: nn.Module) -> None:
        """Load the stored weights into `model` (same architecture, strict)."""
        device = str(next(model.parameters()).device)
        load_model(model, self.path / "model.safetensors", strict=True, device=device)

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

    def get(self, stage: str, key: str) -> Optional[Entry]:
        """The complete entry, or None (always None unless mode is `on`)."""
        if self.mode != "on":
            return None
        path = self.root / stage / key
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return Entry(path, meta)

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold an exclusive lock on one entry (no-op when the cache is off)."""
        if self.mode == "off":
            yield
            return
        path = self.root / stage / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def put(
        self,
        stage: str,
        key: str,
        meta: dict,
        model: Optional[nn.Module] = None,
        run_dir: Optional[Path] = None,
    ) -> None:
        """Write an entry atomically: meta, the model's weights, and `meta["files"]` from
        `run_dir`. Call it while holding `lock(stage, key)`."""
        if self.mode == "off":
            return
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{key}."))
        try:
            if model is not None:
                save_model(model, str(tmp / "model.safetensors"))
            for rel in meta.get("files", []):
                (tmp / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(run_dir) / rel, tmp / "files" / rel)
            atomic_write_json(tmp / "meta.json", {**meta, "stage": stage, "key": key})
            dest = parent / key
            if dest.exists():  # refresh: move the old entry aside, then drop it
                old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{key}.old."))
                os.replace(dest, old / key)
                shutil.rmtree(old)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def snapshot(run_dir: Path) -> dict[str, int]:
    """Files under `run_dir` (relative path -> mtime_ns), minus results.json and .hydra/."""
    out = {}
    for p in Path(run_dir).rglob("*"):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_file() and not rel.startswith(NOT_STAGE_FILES):
            out[rel] = p.stat().st_mtime_ns
    return out


def written_since(before: dict[str, int], run_dir: Path) -> list[str]:
    """Files created or modified in `run_dir` since `before` was taken."""
    return sorted(rel for rel, t in snapshot(run_dir).items() if before.get(rel) != t)
