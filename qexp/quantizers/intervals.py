"""Preserving intervals of deterministic-grid quantizers (docs/design.md §5).

For a weight tensor W and a quantizer, `[lo, hi]` per weight: every value in it quantizes to
the same code while the other weights stay put. The interval is kept inside the range that
sets its block's scale, and the weights that set a scale (absmax, min, max) are pinned
(lo = hi = w). Half-width h = (hi - lo) / 2.

The geometry follows the path a user's model takes, in its dtype:

- the *input lattice* is the dtype the library quantizes from: LLM.int8 casts to float16
  whatever the load dtype (bitsandbytes' `Int8Params`); 4-bit bitsandbytes, GGUF (gguf-py)
  and RTN read the weight in its own dtype (exactly, through float32);
- each library's own arithmetic, in float32 (bnb: `round(x · (127 / absmax))`,
  `bucketize(clamp(x · (1 / absmax)), float32 midpoints)`; gguf-py: `trunc`/`roundf` of
  `x · (1 / d)`; RTN: `round(x / s) + z`), is evaluated on candidate lattice values, so the
  edges are the exact first and last lattice values with the weight's code, not a float64
  approximation of them (`lattice_interval`);
- a weight that is finer than the lattice (a float32 weight under LLM.int8) is inside its
  own box: the box is widened to the weight, and every value between the weight and its
  lattice point rounds to that point.

A property test checks every quantizer against the real libraries, for float32, bfloat16 and
float16 weights, through transformers' loading path for bitsandbytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GGUF_LEVELS = {"q8_0": 127, "q4_0": 8, "q5_0": 16, "q4_1": 15, "q5_1": 31}
NARROW = 1 << 16  # lattice steps around an edge estimate tried before the whole range
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_INT[torch.float64] = torch.int64


# ---------------------------------------------------------------- the lattice


def _key(t: torch.Tensor) -> torch.Tensor:
    """Integer keys monotone in the value (adjacent representable values differ by 1; ±0 ->
    0): int32 for 16-bit dtypes (half the memory traffic), int64 otherwise."""
    it = _INT[t.dtype]
    bits = t.view(it).to(torch.int32 if t.element_size() == 2 else torch.int64)
    sign = torch.iinfo(it).min  # the sign bit as a signed integer
    return torch.where(bits < 0, -(bits - sign), bits)


def _value(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `_key`."""
    it = _INT[dtype]
    sign = torch.iinfo(it).min
    return torch.where(key < 0, (-key) + sign, key).to(it).view(dtype)


def lattice_step(t: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """`t` moved `n` representable values of its dtype up (negative: down); ±0 are one."""
    return _value(_key(t) + n, t.dtype)


Code = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def lattice_interval(
    x: torch.Tensor,
    lattice: torch.dtype,
    code: Code,
    params: dict[str, torch.Tensor],
    lo_guess: torch.Tensor,
    hi_guess: torch.Tensor,
    floor: torch.Tensor,
    ceil: torch.Tensor,
    pinned: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last lattice values in [floor, ceil] whose code equals the code of `x`'s
    lattice point, widened to contain `x`; pinned weights get [x, x]. float64, shape of `x`.

    `code(v, p)` is the library's arithmetic: the code of lattice values `v` given the
    per-element block parameters `p` (the tensors of `params`, broadcast to `x` and taken at
    the same elements as `v`), block scales fixed. Codes are monotone in the value, so each
    edge is found by bisection over the lattice keys: exact whatever the float32 rounding
    does near the edge. The estimates `lo_guess` / `hi_guess` give a bracket of a few steps
    that holds for almost every weight; the others are bisected over their whole range.
    """
    shape = x.shape
    xl = x.to(lattice).reshape(-1)
    flat = {k: t.expand(shape).reshape(-1) for k, t in params.items()}
    kx = _key(xl)
    kfloor = _key(floor.expand(shape).reshape(-1).to(lattice))
    kceil = _key(ceil.expand(shape).reshape(-1).to(lattice))
    own = code(xl, flat)
    free = ~pinned.reshape(-1)

    def holds(k: torch.Tensor, i: torch.Tensor | None) -> torch.Tensor:
        """Key k of element i (None: every element) keeps that element's code and lies in
        its [floor, ceil]."""
        if i is None:
            lo, hi, p, own_i = kfloor, kceil, flat, own
        else:
            lo, hi, p, own_i = kfloor[i], kceil[i], {n: t[i] for n, t in flat.items()}, own[i]
        v = _value(torch.minimum(torch.maximum(k, lo), hi), lattice)
        return (k >= lo) & (k <= hi) & (code(v, p) == own_i)

    def bisect(inn: torch.Tensor, out: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        while True:
            gap = (out - inn).abs() > 1
            if not gap.any():
                return inn
            mid = inn + torch.div(out - inn, 2, rounding_mode="floor")
            h = holds(mid, i)
            inn, out = torch.where(gap & h, mid, inn), torch.where(gap & ~h, mid, out)

    def edge(guess: torch.Tensor, d: int) -> torch.Tensor:
        """The last key from kx in direction d (±1) that holds (kx itself always does)."""
        g64 = guess.expand(shape).reshape(-1)
        v = g64.to(lattice)
        # the estimate rounded towards x on the lattice: almost always the edge itself
        over = v.double() > g64 if d > 0 else v.double() < g64
        kg = _key(v) - d * over.to(kx.dtype)
        far = kfloor - 1 if d < 0 else kceil + 1  # never holds
        kk = torch.minimum(kg, kx) if d < 0 else torch.maximum(kg, kx)
        found = holds(kk, None) & ~holds(kk + d, None)  # every element at once, no gathering
        result = torch.where(found, kk, kx)
        todo = torch.nonzero(free & ~found).reshape(-1)
        for width in (4, 1 << 12, None):  # brackets around the estimate, then everything
            if not todo.numel():
                break
            k, x_k, far_k = kg[todo], kx[todo], far[todo]
            if width is None:
                inn, out = x_k, far_k
                ok = torch.ones_like(inn, dtype=torch.bool)
            else:
                if d < 0:
                    kk = torch.minimum(k, x_k)
                    inn = torch.minimum(kk + width, x_k)
                    out = torch.maximum(kk - width, far_k)
                else:
                    kk = torch.maximum(k, x_k)
                    inn = torch.maximum(kk - width, x_k)
                    out = torch.minimum(kk + width, far_k)
                ok = holds(inn, todo) & ((out == far_k) | ~holds(out, todo))
            sel = todo[ok]
            result[sel] = bisect(inn[ok], out[ok], sel)
            todo = todo[~ok]
        return result

    lo = _value(edge(lo_guess, -1), lattice).double().reshape(shape)
    hi = _value(edge(hi_guess, +1), lattice).double().reshape(shape)
    xd = x.double()
    lo, hi = torch.minimum(lo, xd), torch.maximum(hi, xd)
    return torch.where(pinned, xd, lo), torch.where(pinned, xd, hi)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Flattened view in blocks of `block` consecutive elements (numel % block == 0)."""
    x = w.detach().reshape(-1)
    if x.numel() % block:
        raise ValueError(f"{x.numel()} elements are not a multiple of the block size {block}")
    return x.reshape(-1, block)


# ---------------------------------------------------------------- qexp's RTN


def rtn_intervals(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of qexp's RTN (groups along the input dimension of a [out, in] weight), on
    the weight's own lattice. A last group shorter than `group_size` has its own scale."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    full = (in_f // g) * g
    if full != in_f:
        tail = rtn_intervals(w[:, full:], bits, -1, symmetric)
        if not full:
            return tail
        head = rtn_intervals(w[:, :full], bits, g, symmetric)
        return torch.cat([head[0], tail[0]], 1), torch.cat([head[1], tail[1]], 1)
    x = w.detach().reshape(out_f, in_f // g, g)
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = xf.abs().amax(-1, keepdim=True)
        s = (amax / qmax).clamp_min(1e-12)
        z = torch.zeros_like(s)
        floor, ceil, pinned = -amax, amax, xf.abs() == amax

        def code(v: torch.Tensor, p: dict) -> torch.Tensor:
            return torch.clamp(torch.round(v.float() / p["s"]), -qmax, qmax)
    else:
        qmax = 2**bits - 1
        mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        s = ((mx - mn) / qmax).clamp_min(1e-12)
        z = torch.round(-mn / s)
        floor, ceil, pinned = mn, mx, (xf == mn) | (xf == mx)

        def code(v: torch.Tensor, p: dict) -> torch.Tensor:
            return torch.clamp(torch.round(v.float() / p["s"]) + p["z"], 0, qmax)

    params = {"s": s, "z": z}
    q = code(x, {k: t.expand(x.shape) for k, t in params.items()}) - z
    sd = s.double()
    lo, hi = lattice_interval(
        x, w.dtype, code, params, (q - 0.5) * sd, (q + 0.5) * sd, floor, ceil, pinned
    )
    return lo.reshape(w.shape), hi.reshape(w.shape)


# ---------------------------------------------------------------- bitsandbytes


def _int8_code(v: torch.Tensor, p: dict) -> torch.Tensor:
    return torch.round(v.float() * p["inv"])


def int8_row_intervals(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 (bitsandbytes' `Int8Params`: float16, then `int8_vectorwise_quant`, whose
    CPU kernel computes round(x · (127 / row absmax)) in float32)."""
    x16 = w.detach().to(torch.float16)
    amax = x16.float().abs().amax(1, keepdim=True)
    inv = 127.0 / amax
    q = _int8_code(x16, {"inv": inv}).double()
    inv64 = inv.double()
    return lattice_interval(
        w.detach(),
        torch.float16,
        _int8_code,
        {"inv": inv},
        (q - 0.5) / inv64,
        (q + 0.5) / inv64,
        -amax,
        amax,
        x16.float().abs() == amax,
    )


def fourbit_bounds(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' bucket bounds of a 4-bit code table: float32 midpoints of the sorted
    code values (its CPU `quantize_4bit` bucketizes against exactly these)."""
    values = code.float()[torch.argsort(code.float())]
    return (values[:-1] + values[1:]) / 2


def bucket(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """`torch.bucketize(x, bounds)` (the number of bounds < x) for a short sorted table,
    as int32: a branch-free binary search over the table padded to 2^m - 1 entries (several
    times faster than bucketize on the CPU for a 4-bit code table)."""
    n = 1 << len(bounds).bit_length()
    table = torch.cat([bounds, bounds.new_full((n - 1 - len(bounds),), float("inf"))])
    k = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    step = n // 2
    while step:
        k += (x > table.index_select(0, (k + (step - 1)).int().reshape(-1)).reshape(x.shape)).to(
            torch.uint8
        ) * step
        step //= 2
    return k.int()


def codebook_intervals(
    w: torch.Tensor, code: torch.Tensor, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4/FP4 (bitsandbytes `quantize_4bit`: the weight in its own dtype through float32,
    bucket = bucketize(clamp(x · (1 / block absmax), -1, 1), float32 midpoints))."""
    x = _blocks(w, block)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    inv = 1.0 / amax.clamp(min=1e-38)
    bounds = fourbit_bounds(code)

    def bucket_of(v: torch.Tensor, p: dict) -> torch.Tensor:
        return bucket(torch.clamp(v.float() * p["inv"], -1, 1), bounds)

    k = bucket_of(x, {"inv": inv})
    edges = torch.cat([bounds.new_tensor([-1.0]), bounds, bounds.new_tensor([1.0])]).double()
    a64 = amax.double()
    lo, hi = lattice_interval(
        x,
        w.dtype,
        bucket_of,
        {"inv": inv},
        edges[k] * a64,
        edges[k + 1] * a64,
        -amax,
        amax,
        xf.abs() == amax,
    )
    return lo.reshape(w.shape), hi.reshape(w.shape)


# ---------------------------------------------------------------- GGUF legacy (gguf-py)


def _q8_0_code(v: torch.Tensor, p: dict) -> torch.Tensor:
    """gguf-py's np_roundf(x · (1 / d)) in float32."""
    y = v.float() * p["inv"]
    a = y.abs()
    whole = torch.floor(a)
    return torch.sign(y) * (whole + torch.floor(2 * (a - whole)))


def gguf_intervals(w: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF legacy block types (gguf-py's numpy quantizers on the weight as float32, blocks
    of 32 along rows)."""
    if qtype not in GGUF_LEVELS:
        raise ValueError(
            f"no intervals for GGUF type {qtype!r}; legacy types: " + ", ".join(GGUF_LEVELS)
        )
    levels = GGUF_LEVELS[qtype]
    x = _blocks(w, 32)
    xf = x.float()
    if qtype == "q8_0":  # q = np_roundf(x / d), d = absmax / 127
        amax = xf.abs().amax(-1, keepdim=True)
        d = amax / 127
        params = {"inv": torch.where(d == 0, 0.0, 1.0 / d)}
        code = _q8_0_code
        floor, ceil, pinned = -amax, amax, xf.abs() == amax
        q = code(x, params).double()
        inv64 = params["inv"].double()
        lo_g, hi_g = (q - 0.5) / inv64, (q + 0.5) / inv64
    elif qtype in ("q4_0", "q5_0"):  # q = trunc(x / d + L + 0.5), d = signed absmax / -L
        idx = xf.abs().argmax(-1, keepdim=True)
        mx = torch.take_along_dim(xf, idx, -1)
        d = mx / -levels
        params = {"inv": torch.where(d == 0, 0.0, 1.0 / d)}

        def code(v: torch.Tensor, p: dict) -> torch.Tensor:
            return torch.trunc(v.float() * p["inv"] + (levels + 0.5)).clamp(0, 2 * levels - 1)

        # strictly inside ±|max|: gguf-py takes the first element of largest |x| as the
        # scale, so another weight reaching it (earlier in the block) would take over
        amax = lattice_step(mx.abs().to(w.dtype), -1).float()
        floor, ceil = -amax, amax
        pinned = torch.zeros_like(xf, dtype=torch.bool).scatter_(-1, idx, True)
        c = code(x, {"inv": params["inv"].expand(x.shape)}).double()
        inf = torch.full_like(c, float("inf"))
        ulo = torch.where(c == 0, -inf, c - levels - 0.5)  # clipped end codes are open-ended
        uhi = torch.where(c == 2 * levels - 1, inf, c - levels + 0.5)
        inv64 = params["inv"].double()
        a, b = ulo / inv64, uhi / inv64
        lo_g, hi_g = torch.minimum(a, b), torch.maximum(a, b)
    else:  # q4_1, q5_1: q = trunc((x - min) / d + 0.5), d = (max - min) / L
        mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        d = (mx - mn) / levels
        params = {"inv": torch.where(d == 0, 0.0, 1.0 / d), "mn": mn}

        def code(v: torch.Tensor, p: dict) -> torch.Tensor:
            return torch.trunc((v.float() - p["mn"]) * p["inv"] + 0.5).clamp(0, levels)

        floor, ceil, pinned = mn, mx, (xf == mn) | (xf == mx)
        q = code(x, {k: t.expand(x.shape) for k, t in params.items()}).double()
        inv64 = params["inv"].double()
        lo_g, hi_g = mn.double() + (q - 0.5) / inv64, mn.double() + (q + 0.5) / inv64
    # a code that runs to the end of the grid (or a block of zeros) has no rounding edge on
    # that side: the estimate is the block's range
    lo_g = torch.maximum(torch.nan_to_num(lo_g, nan=0.0), floor.double())
    hi_g = torch.minimum(torch.nan_to_num(hi_g, nan=0.0), ceil.double())
    lo, hi = lattice_interval(x, w.dtype, code, params, lo_g, hi_g, floor, ceil, pinned)
    return lo.reshape(w.shape), hi.reshape(w.shape)


def error_box(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The error box [min(w, ŵ), max(w, ŵ)] of a data-dependent quantizer (GPTQ, AWQ).

    GPTQ/AWQ have no exact preserving interval (error feedback and activation scaling make
    each code depend on the other weights and the calibration data); the gap-attack
    literature constrains weights to the segment between the original and its de-quantized
    value instead (docs/design.md §5). No guarantee that codes are preserved inside it.
    """
    a, b = w.detach().double(), w_hat.detach().double()
    return torch.minimum(a, b), torch.maximum(a, b)


# ---------------------------------------------------------------- scaled float/int grids


NEG_ZERO = -(2.0**-12)  # the code of a negative zero: between -0 and the smallest element


def signed_zero(r: torch.Tensor) -> torch.Tensor:
    """Element values with a negative zero told apart (formats store its sign bit), still
    monotone in the input: -0 becomes NEG_ZERO."""
    return torch.where((r == 0) & torch.signbit(r), NEG_ZERO, r)


def grid_intervals(
    x: torch.Tensor,
    code: Code,
    params: dict[str, torch.Tensor],
    eff: torch.Tensor,
    table: torch.Tensor,
    amax: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of a symmetric absmax format whose elements round `x / eff` to a sorted
    value `table` (FP8 E4M3, FP4 E2M1) and store the sign of a zero: `code` is the
    library's rounding on lattice values through `signed_zero` (per-element parameters in
    `params`), `eff` and `amax` the per-element scale and block absmax (the shape of `x`).
    The block absmax sets the scale: those weights are pinned, the others stay inside
    ±absmax."""
    own = code(x, params).double()
    value = torch.where(own == NEG_ZERO, 0.0, own)
    t = table.double()
    i = torch.searchsorted(t, value.contiguous()).clamp(0, len(t) - 1)
    below = t[(i - 1).clamp_min(0)]
    above = t[(i + 1).clamp_max(len(t) - 1)]
    e = eff.double()
    lo_g = torch.where(i == 0, -torch.inf, (below + value) / 2 * e)
    hi_g = torch.where(i == len(t) - 1, torch.inf, (above + value) / 2 * e)
    lo_g = torch.where(own == 0, 0.0, lo_g)  # +0 starts at zero, -0 ends there
    hi_g = torch.where(own == NEG_ZERO, 0.0, hi_g)
    a = amax.double()
    lo_g, hi_g = torch.maximum(lo_g, -a), torch.minimum(hi_g, a)
    af = amax.float()
    pinned = x.float().abs() == af
    return lattice_interval(x, x.dtype, code, params, lo_g, hi_g, -af, af, pinned)
