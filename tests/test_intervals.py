"""Interval geometry against the real libraries: inside the box → same code, just outside → not."""

import pytest
import torch

from qexp.quantizers import RTN, BitsAndBytes, GGUFQuant
from qexp.quantizers.intervals import rtn_intervals

pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")


def rtn(bits, group, symmetric):
    return RTN(name="rtn", bits=bits, group_size=group, symmetric=symmetric)


# Each quantizer's `codes` is the real library's output; `intervals` is qexp's geometry.
CASES = {
    "rtn4_asym": rtn(4, 64, False),
    "rtn8_sym": rtn(8, 64, True),
    "rtn3_asym": rtn(3, 32, False),
    **{f"bnb_{m}": BitsAndBytes(name=f"bnb_{m}", mode=m) for m in ("int8", "nf4", "fp4")},
    **{
        f"gguf_{q}": GGUFQuant(name=f"gguf_{q}", qtype=q)
        for q in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inside_keeps_codes_outside_changes_them(case, seed):
    q = CASES[case]
    codes, intervals = q.codes, q.intervals
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


def test_error_box_spans_weight_and_dequantized_value():
    from qexp.quantizers.intervals import error_box

    w = torch.tensor([[0.5, -0.2, 0.0]])
    w_hat = torch.tensor([[0.4, -0.1, 0.0]])
    lo, hi = error_box(w, w_hat)
    assert torch.equal(lo, torch.tensor([[0.4, -0.2, 0.0]]).double())
    assert torch.equal(hi, torch.tensor([[0.5, -0.1, 0.0]]).double())


@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_quant_is_constant_on_intervals(case):
    q = CASES[case]
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    deq = q.fake_quant(w)
    lo, hi = q.intervals(w)
    movable = lo < hi
    # (the de-quantized value itself may lie outside the interval, which is kept inside the
    # block's range.) Moving weights to the centres of their intervals keeps the de-quantized model
    centre = torch.where(movable, (lo + hi) / 2, w.double()).float()
    assert torch.equal(q.fake_quant(centre), deq)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if not c.startswith("gguf")])
def test_neighbours_are_the_adjacent_grid_points(case):
    q = CASES[case]
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    deq = q.fake_quant(w)
    down, up = q.neighbours(w)
    assert (down <= deq).all() and (up >= deq).all()
    lo, hi = q.intervals(w)
    movable = lo < hi
    # writing every existing neighbour at once (scale setters kept) quantizes to exactly it
    for nb in (down, up):
        has = movable & (nb != deq)
        assert has.float().mean() > 0.5
        moved = torch.where(has, nb, w)
        assert torch.equal(q.fake_quant(moved)[has], nb[has])
    # and nothing lies strictly between a point and its neighbours
    inner = movable & (up > deq)
    mid = torch.where(inner, (deq + up) / 2 * 0.999 + deq * 0.001, w)
    got = q.fake_quant(mid)[inner]
    assert ((got == deq[inner]) | (got == up[inner])).all()
