"""Check 4, reference diff: where and how the weights differ from a trusted checkpoint.

Both checkpoints are streamed one tensor pair at a time. Per tensor present in both:
`changed_fraction` (elements with w != r), `rel_frobenius` = ‖w - r‖_F / ‖r‖_F and
`max_abs_diff`, in float64. Tensors only on one side are listed (a tied `lm_head.weight`
absent from one side is not a difference when the config ties the embeddings). Changed
tensors are summarised by layer and module kind. Any difference makes the check suspicious:
a trusted reference is meant to be the same model.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from tqdm.auto import tqdm

from qexp.checkpoint.reader import Checkpoint

_LAYER = re.compile(r"layers\.(\d+)\.")


def _tied(ckpt: Checkpoint, name: str) -> bool:
    cfg = ckpt.config or {}
    return name == "lm_head.weight" and bool(cfg.get("tie_word_embeddings", False))


def compare(w: torch.Tensor, r: torch.Tensor, chunk: int = 1 << 22) -> dict[str, float]:
    """Difference statistics of two tensors of the same shape (float64, in chunks)."""
    a, b = w.reshape(-1), r.reshape(-1)
    changed, dd, rr, mx = 0, 0.0, 0.0, 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i : i + chunk].double(), b[i : i + chunk].double()
        d = x - y
        changed += int((x != y).sum())
        dd += float((d * d).sum())
        rr += float((y * y).sum())
        mx = max(mx, float(d.abs().max()))
    dn, rn = dd**0.5, rr**0.5
    return {
        "changed_fraction": changed / a.numel() if a.numel() else 0.0,
        "rel_frobenius": dn / rn if rn > 0 else dn,
        "max_abs_diff": mx,
    }


def run(ckpt: Checkpoint, ref: Checkpoint, progress: bool = True) -> dict[str, Any]:
    """Compare `ckpt` against `ref`, tensor by tensor."""
    ours, theirs = set(ckpt.names), set(ref.names)
    only_ckpt = sorted(n for n in ours - theirs if not _tied(ckpt, n))
    only_ref = sorted(n for n in theirs - ours if not _tied(ref, n))
    changed: list[dict[str, Any]] = []
    shape_mismatch: list[str] = []
    common = [n for n in ckpt.names if n in theirs]
    for name in tqdm(common, desc="audit: reference", disable=not progress):
        if ckpt.shape(name) != ref.shape(name):
            shape_mismatch.append(name)
            continue
        s = compare(ckpt.get(name), ref.get(name))
        if s["changed_fraction"] > 0:
            changed.append({"tensor": name, "dtype": ckpt.dtype(name), **s})
    by_layer: dict[str, int] = defaultdict(int)
    by_kind: dict[str, int] = defaultdict(int)
    for c in changed:
        m = _LAYER.search(c["tensor"])
        by_layer[m.group(1) if m else "other"] += 1
        by_kind[_LAYER.sub("", c["tensor"]).split("model.")[-1]] += 1
    n_diff = len(changed) + len(only_ckpt) + len(only_ref) + len(shape_mismatch)
    return {
        "verdict": "suspicious" if n_diff else "clean",
        "score": {
            "n_changed": len(changed),
            "n_compared": len(common),
            "max_rel_frobenius": max((c["rel_frobenius"] for c in changed), default=0.0),
        },
        "changed": changed,
        "changed_by_layer": dict(sorted(by_layer.items(), key=lambda kv: (len(kv[0]), kv[0]))),
        "changed_by_module": dict(sorted(by_kind.items())),
        "only_in_checkpoint": only_ckpt,
        "only_in_reference": only_ref,
        "shape_mismatch": shape_mismatch,
    }
