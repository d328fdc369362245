"""Stand-alone encryption of a checkpoint directory, streamed shard by shard.

    qexp-encrypt IN_DIR OUT_DIR [key=value ...]      (or python -m qexp.tools.encrypt ...)

Keys are those of conf/attack/encrypt.yaml (e.g. `seed=7 mechanisms=[a,c]`).
The model is never instantiated: each safetensors tensor is read, transformed in float64
and written before the next is read. Other files (config, tokenizer, index) are copied.
OUT_DIR gets a plain Hugging Face checkpoint and `qexp_encrypt_manifest.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qexp.attacks.encrypt import Encrypt
from qexp.core.geometry import geometry
from qexp.tools import streaming

MANIFEST = "qexp_encrypt_manifest.json"


def load_attack(overrides: list[str]) -> Encrypt:
    """attack=encrypt's config with `key=value` overrides, validated like the Hydra app."""
    return streaming.plugin_from_overrides("attack", "encrypt", Encrypt, overrides)


def encrypt_checkpoint(
    src: Path, dst: Path, attack: Encrypt, progress: bool = True, allow_symlinks: bool = False
) -> dict:
    """Encrypt the checkpoint in `src` into a new directory `dst`; returns the manifest."""
    with streaming.open_source(src, dst, allow_symlinks) as ckpt:
        geo = geometry(ckpt.config)
        keys = attack.plan(geo)
        return streaming.transform_checkpoint(
            ckpt,
            dst,
            lambda name, t: attack.transform(
                name, streaming.require_finite(ckpt, name, t), keys, geo
            ),
            lambda name: attack.touches(name, keys),
            (MANIFEST, lambda: attack.manifest(keys, geo)),
            "encrypt",
            progress,
            allow_symlinks=allow_symlinks,
        )


def _work(src: Path, dst: Path, overrides: list[str], progress: bool, symlinks: bool) -> str:
    attack = load_attack(overrides)
    m = encrypt_checkpoint(src, dst, attack, progress, symlinks)
    return (
        f"encrypted {m['tensors_changed']} tensors into {dst} (mechanisms "
        f"{','.join(attack.mechanisms)}, seed {attack.seed})"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 0 ok, 2 bad input."""
    return streaming.cli("qexp-encrypt", __doc__, argv, _work)


if __name__ == "__main__":
    sys.exit(main())
