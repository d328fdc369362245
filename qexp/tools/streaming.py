"""Checkpoint-to-checkpoint transforms, streamed shard by shard (qexp-encrypt,
qexp-canonicalize): the model is never instantiated, each output shard is written tensor by
tensor next to the input's, and the output directory appears whole or not at all.

The input is validated before anything is written (qexp/checkpoint/reader.py); a tensor the
tool transforms must be finite; the output is written into a temporary directory, its index
(when the input has one) names only the shards written into it, and it is opened with the
same validating reader and must hold every tensor of the input before it is renamed into
place. Any failure leaves no output."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from qexp.checkpoint.reader import INDEX, SUFFIX, Checkpoint
from qexp.checkpoint.safetensors_io import SafetensorsError, stream_transform
from qexp.core.console import console
from qexp.core.errors import ConfigError
from qexp.core.io import atomic_dir, atomic_write_json
from qexp.core.memory import share_malloc_arena
from qexp.core.registry import build, option_node

P = TypeVar("P")


def plugin_from_overrides(group: str, option: str, cls: type[P], overrides: list[str]) -> P:
    """`group=option`'s config with `key=value` overrides (`group.` prefix optional),
    validated like the Hydra app."""
    base = option_node(group, option)
    base.pop("_target_", None)
    for o in overrides:
        if "=" not in o:
            raise ConfigError("override", o, "key=value (e.g. seed=3)")
    dots = [o.removeprefix(f"{group}.") for o in overrides]
    values = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(dots)))
    plugin = build(cls, values, group)
    plugin.resolve(None)  # the options it names (e.g. encrypt's `against`), on their own
    return plugin


def open_source(src: Path, dst: Path, allow_symlinks: bool = False) -> Checkpoint:
    """The validated checkpoint in `src` (with config.json), for a `dst` that does not exist
    yet."""
    if not (src / "config.json").is_file():
        raise ConfigError("IN", str(src), "a Hugging Face checkpoint directory with config.json")
    if dst.exists():
        raise ConfigError(
            "OUT", str(dst), "a path that does not exist yet (nothing is overwritten)"
        )
    return Checkpoint(src, "IN", allow_symlinks)


def require_finite(ckpt: Checkpoint, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` when every value is finite; else one SafetensorsError naming the shard, the
    tensor and how many values are NaN or infinite."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise SafetensorsError(
            f"{ckpt.entries[name][0]}: tensor {name} has {bad} non-finite values (NaN/inf); "
            "refusing to transform it"
        )
    return t


def transform_checkpoint(
    ckpt: Checkpoint,
    dst: Path,
    fn: Callable[[str, torch.Tensor], torch.Tensor | None],
    wants: Callable[[str], bool],
    manifest: tuple[str, Callable[[], dict[str, Any]]],
    desc: str,
    progress: bool = True,
    reads: Callable[[str], bool] | None = None,
    allow_symlinks: bool = False,
) -> dict[str, Any]:
    """Write `dst`: each shard of `ckpt` through `stream_transform(fn, wants, reads)`, the
    other files copied, the index rewritten for the shards written, and `manifest[0]` =
    `manifest[1]()` plus the source, its shards and the number of tensors changed; returns
    that manifest."""
    name, make = manifest
    src = ckpt.dir
    with atomic_dir(dst, replace=False) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix != SUFFIX and f.name not in (name, INDEX):
                leaves = f.is_symlink() and src.resolve() not in f.resolve().parents
                if leaves and not allow_symlinks:
                    raise SafetensorsError(
                        f"{f}: a symlink leaving the directory; pass --allow-symlinks to copy "
                        "what it points to"
                    )
                shutil.copy2(f, tmp / f.name)
        changed = 0
        for shard in tqdm(ckpt.shards, desc=desc, disable=not progress):
            changed += stream_transform(shard, tmp / shard.name, fn, wants, {"format": "pt"}, reads)
        if ckpt.index is not None:
            _write_index(ckpt, tmp)
        written = Checkpoint(tmp, "OUT")  # the same rules as the input
        if set(written.entries) != set(ckpt.entries):
            raise SafetensorsError(
                f"{dst}: wrote {len(written.entries)} of {len(ckpt.entries)} tensors"
            )
        body = make()
        body.update(
            {
                "source": src.name,
                "shards": [s.name for s in ckpt.shards],
                "tensors_changed": changed,
            }
        )
        atomic_write_json(tmp / name, body)
    return body


def _write_index(ckpt: Checkpoint, out: Path) -> None:
    """The output's index: every tensor in the shard (a file of `out`) it was written to."""
    meta = json.loads((ckpt.dir / INDEX).read_text(encoding="utf-8")).get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["total_size"] = ckpt.nbytes()
    wmap = {n: shard.name for n, (shard, _, _) in sorted(ckpt.entries.items())}
    atomic_write_json(out / INDEX, {"metadata": meta, "weight_map": wmap})


def cli(
    prog: str,
    doc: str,
    argv: list[str] | None,
    work: Callable[[Path, Path, list[str], bool, bool], str],
) -> int:
    """`prog IN OUT [key=value ...] [--no-progress] [--allow-symlinks]`: `work(src, dst,
    overrides, progress, allow_symlinks)` returns the line to print; exit code 0 ok, 2 bad
    input (one line on stderr)."""
    out = console(prog)
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", type=Path, help="input checkpoint directory (safetensors)")
    p.add_argument("dst", type=Path, help="output directory (must not exist)")
    p.add_argument("overrides", nargs="*", help="config keys, e.g. seed=3")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--allow-symlinks",
        action="store_true",
        help="read shards and copy files that are symlinks leaving IN (refused by default)",
    )
    a = p.parse_args(argv)
    share_malloc_arena()  # reader, writer and compute threads free each other's tensors
    try:
        line = work(a.src, a.dst, a.overrides, not a.no_progress, a.allow_symlinks)
    except (ConfigError, SafetensorsError) as e:
        out.error("%s: error: %s", prog, e)
        return 2
    out.info("%s", line)
    return 0
