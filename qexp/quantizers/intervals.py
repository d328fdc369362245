"""Preserving intervals of deterministic-grid quantizers (DESIGN §5).

For a weight tensor W and a quantizer, `[lo, hi]` per weight: every value in it quantizes to
the same code while the other weights stay put. The interval is also kept inside the range
that sets its block's scale, and the weights that set a scale (absmax, min, max) are pinned
(lo = hi = w). Boundaries follow each library's own rounding (torch.round, bnb's bucketize
over codebook midpoints, gguf's trunc(x + 0.5) / roundf); a property test checks them against
the real libraries. Half-width h = (hi - lo) / 2.
"""

from __future__ import annotations

import torch

GGUF_LEVELS = {"q8_0": 127, "q4_0": 8, "q5_0": 16, "q4_1": 15, "q5_1": 31}


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Flattened float64 view in blocks of `block` consecutive elements (numel % block == 0)."""
    x = w.detach().double().reshape(-1)
    if x.numel() % block:
        raise ValueError(f"{x.numel()} elements are not a multiple of the block size {block}")
    return x.reshape(-1, block)


def _finish(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, pinned: torch.Tensor, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.where(pinned, x, lo)
    hi = torch.where(pinned, x, hi)
    return lo.reshape(shape), hi.reshape(shape)


def _in_range(x, lo, hi, rmin, rmax):
    return torch.maximum(lo, rmin), torch.minimum(hi, rmax)


def rtn_intervals(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of qexp's RTN (groups along the input dimension of a [out, in] weight).

    A last group shorter than `group_size` has its own scale, as in `rtn_fake_quant`.
    """
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    full = (in_f // g) * g
    if full != in_f:
        tail = rtn_intervals(w[:, full:], bits, -1, symmetric)
        if not full:
            return tail
        head = rtn_intervals(w[:, :full], bits, g, symmetric)
        return torch.cat([head[0], tail[0]], 1), torch.cat([head[1], tail[1]], 1)
    x = w.detach().double().reshape(out_f, in_f // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = x.abs().amax(-1, keepdim=True)
        s = (amax.float() / qmax).clamp_min(1e-12).double()
        q = torch.clamp(torch.round(x.float() / s.float()), -qmax, qmax).double()
        lo, hi = (q - 0.5) * s, (q + 0.5) * s
        lo, hi = _in_range(x, lo, hi, -amax, amax)
        pinned = x.abs() == amax
    else:
        qmax = 2**bits - 1
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s = ((mx.float() - mn.float()) / qmax).clamp_min(1e-12).double()
        z = torch.round(-mn.float() / s.float()).double()
        q = torch.clamp(torch.round(x.float() / s.float()) + z.float(), 0, qmax).double()
        lo, hi = (q - z - 0.5) * s, (q - z + 0.5) * s
        lo, hi = _in_range(x, lo, hi, mn, mx)
        pinned = (x == mn) | (x == mx)
    return _finish(x, lo, hi, pinned, w.shape)


def int8_row_intervals(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 weights (bitsandbytes int8_vectorwise_quant): round(w · 127 / row absmax)."""
    x = w.detach().double()
    amax = x.abs().amax(1, keepdim=True)
    inv = (127.0 / amax.float()).double()
    q = torch.round(x.float() * inv.float()).double()
    lo, hi = (q - 0.5) / inv, (q + 0.5) / inv
    lo, hi = _in_range(x, lo, hi, -amax, amax)
    return _finish(x, lo, hi, x.abs() == amax, w.shape)


def codebook_intervals(
    w: torch.Tensor, code: torch.Tensor, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4/FP4 (bitsandbytes): nearest code value of w / block absmax, by midpoint buckets."""
    x = _blocks(w, block)
    # sorted with duplicates kept: FP4 has -0 and +0 as two codes, split at 0 like bnb does
    values = torch.sort(code.double()).values
    mids = (values[1:] + values[:-1]) / 2
    amax = x.abs().amax(-1, keepdim=True)
    scaled = (x.float() * (1.0 / amax.float().clamp(min=1e-38))).clamp(-1, 1).double()
    k = torch.bucketize(scaled, mids)  # mids[k-1] < scaled <= mids[k]
    edges = torch.cat(
        [torch.tensor([-1.0], dtype=torch.float64), mids, torch.tensor([1.0], dtype=torch.float64)]
    )
    lo, hi = edges[k] * amax, edges[k + 1] * amax
    lo, hi = _in_range(x, lo, hi, -amax, amax)
    return _finish(x, lo, hi, x.abs() == amax, w.shape)


def gguf_intervals(w: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF legacy block types (gguf-py's numpy quantizers, blocks of 32 along rows)."""
    x = _blocks(w, 32)
    xf = x.float()
    if qtype == "q8_0":  # q = roundf(x / d), d = absmax / 127, round half away from zero
        amax = xf.abs().amax(-1, keepdim=True)
        d = amax / 127
        inv = torch.where(d == 0, 0.0, 1.0 / d).double()
        q = torch.sign(xf * inv.float()) * torch.floor((xf * inv.float()).abs() + 0.5)
        lo, hi = (q.double() - 0.5) / inv, (q.double() + 0.5) / inv
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
        a = amax.double()
        lo, hi = _in_range(x, lo, hi, -a, a)
        pinned = x.abs() == a
    elif qtype in ("q4_0", "q5_0"):  # q = trunc(x / d + L + 0.5), d = signed absmax / -L
        levels = GGUF_LEVELS[qtype]
        idx = xf.abs().argmax(-1, keepdim=True)
        mx = torch.take_along_dim(xf, idx, -1)
        d = mx / -levels
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        u = torch.trunc(xf * inv + (levels + 0.5)).clamp(0, 2 * levels - 1).double()
        inv64 = inv.double()
        inf = torch.full_like(u, float("inf"))
        ulo = torch.where(u == 0, -inf, u - levels - 0.5)  # clipped end codes are open-ended
        uhi = torch.where(u == 2 * levels - 1, inf, u - levels + 0.5)
        lo, hi = ulo / inv64, uhi / inv64
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
        a = mx.double().abs()
        lo, hi = _in_range(x, lo, hi, -a, a)
        pinned = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    elif qtype in ("q4_1", "q5_1"):  # q = trunc((x - min) / d + 0.5), d = (max - min) / L
        levels = GGUF_LEVELS[qtype]
        mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        d = (mx - mn) / levels
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = torch.trunc((xf - mn) * inv + 0.5).clamp(0, levels).double()
        inv64 = inv.double()
        lo = mn.double() + (q - 0.5) / inv64
        hi = mn.double() + (q + 0.5) / inv64
        lo, hi = _in_range(x, lo, hi, mn.double(), mx.double())
        pinned = (x == mn.double()) | (x == mx.double())
    else:
        raise ValueError(
            f"no intervals for GGUF type {qtype!r}; legacy types: " + ", ".join(GGUF_LEVELS)
        )
    return _finish(x, lo, hi, pinned, w.shape)


def error_box(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The error box [min(w, ŵ), max(w, ŵ)] of a data-dependent quantizer (GPTQ, AWQ).

    GPTQ/AWQ have no exact preserving interval (error feedback and activation scaling make
    each code depend on the other weights and the calibration data); the gap-attack
    literature constrains weights to the segment between the original and its de-quantized
    value instead (DESIGN §5). No guarantee that codes are preserved inside it.
    """
    a, b = w.detach().double(), w_hat.detach().double()
    return torch.minimum(a, b), torch.maximum(a, b)
