"""Interval geometry against the real libraries: inside the box → same code, just outside → not."""

import pytest
import torch

from qexp.quantizers import rtn_fake_quant
from qexp.quantizers.intervals import (
    codebook_intervals,
    gguf_intervals,
    int8_row_intervals,
    rtn_intervals,
)

bnb_f = pytest.importorskip("bitsandbytes.functional")
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def rtn_codes(bits, group, symmetric):
    return lambda w: rtn_fake_quant(w, bits, group, symmetric)


def int8_codes(w):
    return bnb_f.int8_vectorwise_quant(w.clone())[0]


def fourbit_codes(kind):
    def f(w):
        packed, st = bnb_f.quantize_4bit(w.clone(), blocksize=64, quant_type=kind)
        return torch.cat([packed.reshape(-1).to(torch.float32), st.absmax.reshape(-1)])

    return f


def gguf_codes(qtype):
    t = getattr(GGMLQuantizationType, qtype.upper())
    return lambda w: torch.from_numpy(gguf_quants.quantize(w.numpy(), t).copy())


CASES = {
    "rtn4_asym": (rtn_codes(4, 64, False), lambda w: rtn_intervals(w, 4, 64, False)),
    "rtn8_sym": (rtn_codes(8, 64, True), lambda w: rtn_intervals(w, 8, 64, True)),
    "rtn3_asym": (rtn_codes(3, 32, False), lambda w: rtn_intervals(w, 3, 32, False)),
    "bnb_int8": (int8_codes, int8_row_intervals),
    "bnb_nf4": (
        fourbit_codes("nf4"),
        lambda w: codebook_intervals(w, bnb_f.get_4bit_type("nf4", device="cpu")),
    ),
    "bnb_fp4": (
        fourbit_codes("fp4"),
        lambda w: codebook_intervals(w, bnb_f.get_4bit_type("fp4", device="cpu")),
    ),
    **{
        f"gguf_{q}": (gguf_codes(q), lambda w, q=q: gguf_intervals(w, q))
        for q in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inside_keeps_codes_outside_changes_them(case, seed):
    codes, intervals = CASES[case]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 128, generator=g) * 0.05
    lo, hi = intervals(w)
    assert (lo <= w.double()).all() and (w.double() <= hi).all()
    pinned = lo == hi
    assert pinned.any() and pinned.float().mean() < 0.2
    base = codes(w)
    # every weight moved somewhere strictly inside its box, all at once
    u = torch.rand(w.shape, generator=g, dtype=torch.float64)
    inside = (lo + (hi - lo) * (0.05 + 0.9 * u)).float()
    assert torch.equal(codes(inside), base)
    # non-pinned weights whose box edge is a rounding boundary (not the block's range):
    rng = w.double().abs().reshape(16, -1).amax(1, keepdim=True).expand(16, 128)
    movable = ~pinned & (hi < rng - 1e-9) & (hi > lo)
    idx = torch.nonzero(movable)[:: max(1, int(movable.sum()) // 40)]
    changed = 0
    for i, j in idx.tolist():
        out = w.clone()
        out[i, j] = float(hi[i, j] + 0.05 * (hi[i, j] - lo[i, j]))
        changed += not torch.equal(codes(out), base)
    assert changed == len(idx) > 0


def test_half_width_law_for_uniform_positions():
    """DESIGN §5 sanity law: Gaussian noise with sigma = h changes ~39% of codes."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    lo, hi = rtn_intervals(w, 8, 128, True)
    h = (hi - lo) / 2
    ok = h > 0
    noisy = w.double() + torch.randn(w.shape, generator=g, dtype=torch.float64) * h
    flipped = ((noisy < lo) | (noisy > hi))[ok].double().mean()
    assert 0.35 < float(flipped) < 0.43
