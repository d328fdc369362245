"""Checkpoint-to-checkpoint transforms, streamed shard by shard (qexp-encrypt,
qexp-canonicalize): the model is never instantiated, each output shard is written tensor by
tensor next to the input's, and the output directory appears whole or not at all."""

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

from qexp.checkpoint.safetensors_io import SafetensorsError, read_header, stream_transform
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


def source_shards(src: Path, dst: Path) -> tuple[dict[str, Any], list[Path]]:
    """config.json and the intact shards of `src`, for a `dst` that does not exist yet."""
    if not (src / "config.json").is_file():
        raise ConfigError("IN", str(src), "a Hugging Face checkpoint directory with config.json")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ConfigError("IN", str(src), "a checkpoint with *.safetensors weights")
    if dst.exists():
        raise ConfigError(
            "OUT", str(dst), "a path that does not exist yet (nothing is overwritten)"
        )
    for shard in shards:  # every shard intact before anything is written
        read_header(shard)
    return json.loads((src / "config.json").read_text()), shards


def transform_checkpoint(
    src: Path,
    dst: Path,
    shards: list[Path],
    fn: Callable[[str, torch.Tensor], torch.Tensor | None],
    wants: Callable[[str], bool],
    manifest: tuple[str, Callable[[], dict[str, Any]]],
    desc: str,
    progress: bool = True,
    reads: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Write `dst`: each shard of `src` through `stream_transform(fn, wants, reads)`, the
    other files copied, and `manifest[0]` = `manifest[1]()` plus the source, its shards and
    the number of tensors changed; returns that manifest."""
    name, make = manifest
    with atomic_dir(dst, replace=False) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix != ".safetensors" and f.name != name:
                shutil.copy2(f, tmp / f.name)
        changed = 0
        for shard in tqdm(shards, desc=desc, disable=not progress):
            changed += stream_transform(shard, tmp / shard.name, fn, wants, {"format": "pt"}, reads)
        body = make()
        body.update(
            {"source": src.name, "shards": [s.name for s in shards], "tensors_changed": changed}
        )
        atomic_write_json(tmp / name, body)
    return body


def cli(
    prog: str, doc: str, argv: list[str] | None, work: Callable[[Path, Path, list[str], bool], str]
) -> int:
    """`prog IN OUT [key=value ...] [--no-progress]`: `work(src, dst, overrides, progress)`
    returns the line to print; exit code 0 ok, 2 bad input (one line on stderr)."""
    out = console(prog)
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", type=Path, help="input checkpoint directory (safetensors)")
    p.add_argument("dst", type=Path, help="output directory (must not exist)")
    p.add_argument("overrides", nargs="*", help="config keys, e.g. seed=3")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    share_malloc_arena()  # reader, writer and compute threads free each other's tensors
    try:
        line = work(a.src, a.dst, a.overrides, not a.no_progress)
    except (ConfigError, SafetensorsError) as e:
        out.error("%s: error: %s", prog, e)
        return 2
    out.info("%s", line)
    return 0
