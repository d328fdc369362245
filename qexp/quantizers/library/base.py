"""Shared by the library back-ends: copy a library's quantized model back into the fp model.

Each quantized module's de-quantized weight must reproduce the library's own forward on a
probe input (relative error within `tol`) before it is copied; every parameter the library
changed outside the quantized modules (AWQ rescales norms) is copied too.
"""

from __future__ import annotations

import torch
from torch import nn


def relative_error(y: torch.Tensor, y_lib: torch.Tensor) -> float:
    """‖y − y_lib‖ / ‖y_lib‖."""
    return float((y - y_lib).norm() / y_lib.norm().clamp_min(1e-12))


def copy_checked(
    lin: nn.Linear,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    rel: float,
    tol: float,
    name: str,
    library: str,
) -> None:
    """Copy a de-quantized weight (and bias) into `lin` if it matched the library's forward."""
    if not rel <= tol:
        raise RuntimeError(
            f"{name}: the de-quantized weight does not reproduce {library}'s forward "
            f"(relative error {rel:.3g} > kernel_tol {tol}); refusing to evaluate a "
            "different model"
        )
    lin.weight.copy_(w.to(lin.weight.dtype))
    if bias is not None:
        lin.bias.copy_(bias)


def copy_rest(qmodel: nn.Module, model: nn.Module, quantized: set[str], library: str) -> None:
    """Copy every parameter outside the quantized modules; fail if nothing was quantized."""
    if not quantized:
        raise RuntimeError(f"{library} quantized no module; nothing to evaluate")
    own = dict(model.named_parameters())
    for name, p in qmodel.named_parameters():
        if name.rpartition(".")[0] not in quantized and name in own:
            own[name].copy_(p.to(own[name].dtype))


def copy_module_checked(
    lin: nn.Linear, module: nn.Module, gen: torch.Generator, tol: float, name: str, library: str
) -> float:
    """Copy a library module's `dequantize()` into `lin` once the module's own forward on a
    seeded probe input reproduced it; returns the relative error."""
    deq = module.dequantize()
    x = torch.randn(4, lin.in_features, generator=gen).to(lin.weight)
    ref = x @ deq.T + (lin.bias if lin.bias is not None else 0)
    rel = relative_error(ref, module(x))
    copy_checked(lin, deq, None, rel, tol, name, library)
    return rel
