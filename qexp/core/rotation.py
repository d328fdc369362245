"""llm-compressor's rotations (`SpinQuantModifier`, `QuIPModifier`), shared by defense=rotate
and the rotated quantizer options: the names the library accepts, the size rules its
transforms need, and the modifier as the library builds it.

- SpinQuant: R1 (residual stream), R2 (per attention head), R4 (down_proj inputs, online);
- QuIP: V (every linear's input side, online), U (its output side, online inverse).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from qexp.core.errors import check, check_choice

METHODS = ("spinquant", "quip")
ROTATIONS = {"spinquant": ("R1", "R2", "R4"), "quip": ("v", "u")}
ONLINE = {"R4", "v", "u"}  # a rotation with an activation-side (hooked) part
TRANSFORM_TYPES = ("hadamard", "random-hadamard", "random-matrix")
INSTALL = "pip install 'qexp[llmcompressor]' (llm-compressor 0.14, compressed-tensors 0.19)"


def check_rotation(prefix: str, method: str, rotations: list, transform_type: str) -> None:
    """The method, its rotation names and a transform type that keeps the function."""
    check_choice(f"{prefix}method", method, METHODS)
    allowed = ROTATIONS[method]
    what = f"a non-empty subset of {', '.join(allowed)} (method={method})"
    check(len(rotations) > 0, f"{prefix}rotations", rotations, what)
    for r in rotations:
        check(r in allowed, f"{prefix}rotations", r, what)
    check_choice(f"{prefix}transform_type", transform_type, TRANSFORM_TYPES)
    check(
        not (method == "spinquant" and transform_type == "random-matrix"),
        f"{prefix}transform_type",
        transform_type,
        "hadamard or random-hadamard with method=spinquant (a random matrix is not "
        "orthogonal, and only an orthogonal rotation commutes with the RMSNorms between "
        "R1's sites)",
    )


def check_sizes(
    prefix: str,
    config: Any,
    rotations: list,
    transform_type: str,
    block_size: Optional[int],
) -> None:
    """The transform sizes exist on a model config: a block size divides every width it
    rotates, and deterministic Hadamard needs sizes 2^n."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    rotated = {  # the widths each rotation's transforms act on
        "R1": [hidden],
        "R2": [head],
        "R4": [inter],
        "v": [hidden, heads * head, inter],
        "u": [hidden, heads * head, kv * head, inter],
    }
    widths = sorted({w for r in rotations for w in rotated[r]})
    if block_size is not None:
        bad = [w for w in widths if w % block_size]
        check(not bad, f"{prefix}block_size", block_size, f"a divisor of {widths}")
    sizes = [block_size] if block_size is not None else widths
    if transform_type == "hadamard":
        bad = [s for s in sizes if s & (s - 1)]
        check(
            not bad,
            f"{prefix}transform_type",
            transform_type,
            f"random-hadamard or random-matrix (deterministic Hadamard needs sizes 2^n; "
            f"this model rotates {sizes}), or a block_size 2^n dividing them",
        )


def modifier(
    method: str,
    rotations: list,
    transform_type: str,
    block_size: Optional[int],
    precision: str = "float64",
) -> Any:
    """llm-compressor's modifier for a rotation, as its examples construct it."""
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    cls = SpinQuantModifier if method == "spinquant" else QuIPModifier
    return cls(
        rotations=list(rotations),
        transform_type=transform_type,
        transform_block_size=block_size,
        precision=getattr(torch, precision),
    )
