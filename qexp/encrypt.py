"""Stand-alone encryption of a checkpoint directory, streamed shard by shard.

    qexp-encrypt IN_DIR OUT_DIR [key=value ...]      (or python -m qexp.encrypt ...)

Keys are those of qexp/conf/attack/encrypt.yaml (e.g. `seed=7 mechanisms=[a,c]`).
The model is never instantiated: each safetensors tensor is read, transformed in float64
and written before the next is read. Other files (config, tokenizer, index) are copied.
OUT_DIR gets a plain Hugging Face checkpoint and `qexp_encrypt_manifest.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from qexp.attacks.encrypt import Encrypt
from qexp.cli import console
from qexp.config import build, option_node
from qexp.errors import ConfigError
from qexp.io import atomic_dir, atomic_write_json
from qexp.models.geometry import geometry
from qexp.safetensors_io import SafetensorsError, read_header, stream_transform

MANIFEST = "qexp_encrypt_manifest.json"


def load_attack(overrides: list[str]) -> Encrypt:
    """attack=encrypt's config with `key=value` overrides, validated like the Hydra app."""
    base = option_node("attack", "encrypt")
    base.pop("_target_", None)
    for o in overrides:
        if "=" not in o:
            raise ConfigError("override", o, "key=value (e.g. seed=3)")
    dots = [o.removeprefix("attack.") for o in overrides]
    values = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(dots)))
    return build(Encrypt, values, "attack")


def encrypt_checkpoint(src: Path, dst: Path, attack: Encrypt, progress: bool = True) -> dict:
    """Encrypt the checkpoint in `src` into a new directory `dst`; returns the manifest."""
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
    geo = geometry(json.loads((src / "config.json").read_text()))
    keys = attack.plan(geo)
    with atomic_dir(dst, replace=False) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix != ".safetensors" and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        changed = 0
        for shard in tqdm(shards, desc="encrypt", disable=not progress):
            changed += stream_transform(
                shard,
                tmp / shard.name,
                lambda name, t: attack.transform(name, t, keys, geo),
                lambda name: attack.touches(name, keys),
                metadata={"format": "pt"},
            )
        manifest = attack.manifest(keys, geo)
        manifest.update(
            {"source": src.name, "shards": [s.name for s in shards], "tensors_changed": changed}
        )
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 0 ok, 2 bad input."""
    out = console("qexp-encrypt")
    p = argparse.ArgumentParser(
        prog="qexp-encrypt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="input checkpoint directory (safetensors)")
    p.add_argument("dst", type=Path, help="output directory (must not exist)")
    p.add_argument("overrides", nargs="*", help="attack keys, e.g. seed=3 mechanisms=[a,b]")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        attack = load_attack(a.overrides)
        m: dict[str, Any] = encrypt_checkpoint(a.src, a.dst, attack, not a.no_progress)
    except (ConfigError, SafetensorsError) as e:
        out.error("qexp-encrypt: error: %s", e)
        return 2
    out.info(
        "encrypted %d tensors into %s (mechanisms %s, seed %d)",
        m["tensors_changed"],
        a.dst,
        ",".join(attack.mechanisms),
        attack.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
