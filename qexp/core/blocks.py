"""Per-block outliers of a weight matrix: shared by attack=outlier, defense=clip and the audit.

A block is `block` consecutive input weights of one row (the layout of every group/block
quantizer here); its outlier is its largest-|w| weight, and its ratio is that |w| over the
block's second largest |w|.
"""

from __future__ import annotations

import torch


def block_top2(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row and block ([out, in/block]): the column of the largest |w|, that |w| and the
    second largest |w| (float32; a tied maximum is its own second). From maxima rather than a
    top-k; for 16-bit weights over the magnitude bits (ordered like |w|), then decoded."""
    x = w.detach()
    if x.element_size() == 2:
        a = (x.view(torch.int16) & 0x7FFF).reshape(x.shape[0], -1, block)
    else:
        a = x.abs().float().reshape(x.shape[0], -1, block)
    top = a.argmax(-1, keepdim=True)  # one of the largest; a tie leaves its twin in the rest
    first = a.gather(-1, top)[..., 0]
    second = a.scatter_(-1, top, 0).amax(-1)  # `a` is a fresh tensor: changed in place
    if x.element_size() == 2:
        first, second = first.view(x.dtype).float(), second.view(x.dtype).float()
    cols = top[..., 0] + torch.arange(0, w.shape[1], block, device=w.device)
    return cols, first, second


def block_ratio(w: torch.Tensor, block: int) -> torch.Tensor:
    """max |w| / second max |w| of every block ([out, in/block]; 1 for an all-zero block,
    finite and huge where only the second is 0)."""
    _, first, second = block_top2(w, block)
    return torch.where(first == 0, torch.ones_like(first), first / second.clamp_min(1e-30))


def outlier_only(w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`w` with every weight but those at `cols` (per row) set to zero."""
    return torch.zeros_like(w).scatter_(1, cols, w.gather(1, cols))
