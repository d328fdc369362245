"""Stand-alone canonicalization of a checkpoint directory, streamed shard by shard.

    qexp-canonicalize IN_DIR OUT_DIR [key=value ...]   (or python -m qexp.tools.canonicalize ...)

Keys are those of conf/defense/canonicalize.yaml (e.g. `parts=[vo,qk,mlp,norm]`). The
model is never instantiated: when the first tensor of a decoder layer that a part rewrites
comes up, that layer's tensors the parts read are loaded (from whichever shard holds them),
canonicalized in place (`qexp.defenses.canonicalize.canonicalize_tensors`, the arithmetic of
`defense=canonicalize`, so the bytes equal the in-memory defense's), and written as their
turn comes; other tensors are copied as bytes. The next layer is computed in a background
thread while this one is written, so at most about two layers are held. OUT_DIR gets a plain
Hugging Face checkpoint and `qexp_canonicalize_manifest.json`.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from qexp.checkpoint.reader import Checkpoint
from qexp.checkpoint.safetensors_io import SafetensorsError
from qexp.core.geometry import Geometry, geometry, parse_name, parse_norm_name
from qexp.defenses.canonicalize import Canonicalize, roles
from qexp.tools import streaming

MANIFEST = "qexp_canonicalize_manifest.json"


def load_defense(overrides: list[str]) -> Canonicalize:
    """defense=canonicalize's config with `key=value` overrides, validated like the Hydra app."""
    return streaming.plugin_from_overrides("defense", "canonicalize", Canonicalize, overrides)


class LayerStream:
    """Canonical tensors of a checkpoint, one decoder layer at a time, in any tensor order."""

    def __init__(self, ckpt: Checkpoint, geo: Geometry, defense: Canonicalize) -> None:
        self.ckpt, self.geo, self.defense = ckpt, geo, defense
        self.roles = roles(defense.parts, geo)
        self.names: dict[int, dict[str, str]] = {}
        for name in ckpt.names:
            parsed = self._parse(name)
            if parsed is not None and parsed[1] in self.roles:
                self.names.setdefault(parsed[0], {})[parsed[1]] = name
        self.order = list(dict.fromkeys(self._parse(n)[0] for n in ckpt.names if self.wants(n)))
        self.pending: dict[int, Future] = {}
        self.cond: dict[int, float] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canonicalize")

    @staticmethod
    def _parse(name: str) -> tuple[int, str] | None:
        return parse_name(name) or parse_norm_name(name)

    def wants(self, name: str) -> bool:
        """Whether the configured parts rewrite this tensor."""
        parsed = self._parse(name)
        return parsed is not None and self.names.get(parsed[0], {}).get(parsed[1]) == name

    def _compute(self, layer: int) -> dict[str, torch.Tensor]:
        names = self.names[layer]
        tensors = {
            r: streaming.require_finite(self.ckpt, n, self.ckpt.get(n)) for r, n in names.items()
        }
        missing = [r for r in self.roles if r.endswith("weight") and r not in tensors]
        missing += [r for r in ("input_norm", "post_norm") if r in self.roles and r not in tensors]
        if missing:
            shard = self.ckpt.entries[next(iter(names.values()))][0]
            raise SafetensorsError(
                f"{shard}: layer {layer} has no {', '.join(sorted(missing))} tensor (the "
                "canonical form needs every tensor of its parts)"
            )
        with torch.no_grad():
            cond = self.defense.canonicalize(tensors, self.geo)
        if cond:
            self.cond[layer] = max(cond)
        return tensors

    def _submit(self, layer: int) -> None:
        if layer not in self.pending:
            self.pending[layer] = self.pool.submit(self._compute, layer)

    def transform(self, name: str, _: torch.Tensor | None) -> torch.Tensor:
        """The canonical version of a tensor `wants` accepted (its layer computed on first
        use, the next layer in the file started in the background)."""
        layer, role = self._parse(name)
        self._submit(layer)
        tensors = self.pending[layer].result()
        i = self.order.index(layer)
        if i + 1 < len(self.order):
            self._submit(self.order[i + 1])
        return tensors.pop(role)  # an emptied layer stays: never computed again

    def close(self) -> None:
        """Stop the background thread."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def manifest(self) -> dict[str, Any]:
        """Parts, geometry and the largest V/O condition number of A per layer."""
        return {
            "defense": {"name": self.defense.name, "parts": list(self.defense.parts)},
            "geometry": self.geo.__dict__,
            "vo_max_condition_of_A": {str(k): v for k, v in sorted(self.cond.items())},
        }


def canonicalize_checkpoint(
    src: Path,
    dst: Path,
    defense: Canonicalize,
    progress: bool = True,
    allow_symlinks: bool = False,
) -> dict:
    """Canonicalize the checkpoint in `src` into a new directory `dst`; returns the manifest."""
    with torch.no_grad(), streaming.open_source(src, dst, allow_symlinks) as ckpt:
        geo = geometry(ckpt.config)
        stream = LayerStream(ckpt, geo, defense)
        try:
            return streaming.transform_checkpoint(
                ckpt,
                dst,
                stream.transform,
                stream.wants,
                (MANIFEST, stream.manifest),
                "canonicalize",
                progress,
                reads=lambda _: False,  # the layer is read whole from the checkpoint
                allow_symlinks=allow_symlinks,
            )
        finally:
            stream.close()


def _work(src: Path, dst: Path, overrides: list[str], progress: bool, symlinks: bool) -> str:
    defense = load_defense(overrides)
    m = canonicalize_checkpoint(src, dst, defense, progress, symlinks)
    return (
        f"canonicalized {m['tensors_changed']} tensors into {dst} (parts {','.join(defense.parts)})"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 0 ok, 2 bad input."""
    return streaming.cli("qexp-canonicalize", __doc__, argv, _work)


if __name__ == "__main__":
    sys.exit(main())
