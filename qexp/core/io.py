"""Atomic file writes: a crash never leaves a half-written file or directory behind.

Temp files and dirs are created next to their destination and renamed into place; their
permissions follow the process umask like a plain `open`/`mkdir` (mkstemp and mkdtemp would
leave 0600/0700, awkward on the shared filesystems sweeps run on).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(dest: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temp dir next to `dest`, renamed to `dest` when the block succeeds (removed if it
    fails). An existing `dest` is replaced (moved aside, then deleted) when `replace`, else
    left alone and FileExistsError is raised."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if dest.exists():
            if not replace:
                raise FileExistsError(f"{dest} already exists")
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
            os.replace(dest, old / dest.name)
            shutil.rmtree(old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory and a rename."""
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Atomically write one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file (blank lines ignored)."""
    return [row for _, row in jsonl_lines(path)]


def jsonl_lines(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line; a line that is not JSON raises
    JSONLError naming the file and that line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise JSONLError(f"{path}:{n}", e.msg) from None
    return out


class JSONLError(ValueError):
    """A line of a JSONL file that is not JSON."""

    def __init__(self, where: str, why: str) -> None:
        self.where, self.why = where, why
        super().__init__(f"{where}: not JSON ({why})")


def load_records(path: str | Path, key: str) -> list[tuple[str, Any]]:
    """(where, row) of every row of a data file: a .jsonl (where = `file:line`) or a .json
    list, or {"data": [...]} (where = `file[i]`). Unreadable or empty files are one
    ConfigError naming `key` and the place."""
    from qexp.core.errors import ConfigError

    p = Path(path)
    try:
        if p.suffix == ".jsonl":
            rows = [(f"{p}:{n}", r) for n, r in jsonl_lines(p)]
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "data" in data:
                data = data["data"]
            if not isinstance(data, list):
                raise ConfigError(key, str(p), 'a JSON list of rows (or {"data": [...]})')
            rows = [(f"{p}[{i}]", r) for i, r in enumerate(data)]
    except JSONLError as e:
        raise ConfigError(key, e.where, f"a JSON object per line ({e.why})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"{p}:{e.lineno}", f"valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, str(p), f"a readable UTF-8 file ({e})") from None
    if not rows:
        raise ConfigError(key, str(p), "a file with at least one row")
    for where, r in rows:
        if not isinstance(r, dict):
            raise ConfigError(key, where, "rows that are JSON objects")
    return rows
