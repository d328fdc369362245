"""Interval geometry against the real libraries: inside the box → same code, just outside → not."""

import pytest
import torch

from qexp.quantizers.bnb import BitsAndBytes
from qexp.quantizers.gguf import GGUFQuant
from qexp.quantizers.intervals import lattice_step, rtn_intervals
from qexp.quantizers.rtn import RTN

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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def into_box(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype) -> torch.Tensor:
    """float64 points as `dtype` values, nudged one step inwards where rounding left the box."""
    v = t.to(dtype)
    v = torch.where(v.double() < lo, lattice_step(v, 1), v)
    return torch.where(v.double() > hi, lattice_step(v, -1), v)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_inside_keeps_codes_outside_changes_them(case, dtype, seed):
    """The library's codes on the weight's own dtype: every weight inside its box, the
    codes kept with all weights at once anywhere inside (edges included), and one step past
    a rounding edge changes them."""
    q, dt = CASES[case], DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(16, 128, generator=g) * 0.05).to(dt)
    lo, hi = q.intervals(w)
    assert (lo <= w.double()).all() and (w.double() <= hi).all()
    pinned = lo == hi
    assert pinned.any() and pinned.float().mean() < 0.2
    base = q.codes(w)
    u = torch.rand(w.shape, generator=g, dtype=torch.float64)
    for points in (lo, hi, lo + (hi - lo) * u):
        assert torch.equal(q.codes(into_box(points, lo, hi, dt)), base)
    # a step past an edge that is a rounding boundary (not the block's range), one at a time
    lattice = torch.float16 if case == "bnb_int8" else dt  # what the library quantizes from
    nxt = lattice_step(hi.to(lattice), 1)
    block = w.double().reshape(-1, 32)
    bmax = block.amax(1, keepdim=True).expand(-1, 32).reshape(w.shape)
    amax = block.abs().amax(1, keepdim=True).expand(-1, 32).reshape(w.shape)
    near = lattice_step(amax.to(lattice), -1).double()
    movable = ~pinned & (hi > lo) & (nxt.double() < bmax) & (nxt.double() < near)
    idx = torch.nonzero(movable)[:: max(1, int(movable.sum()) // 30)]
    changed = 0
    for i, j in idx.tolist():
        out = w.clone()
        out[i, j] = nxt[i, j].to(dt)
        changed += not torch.equal(q.codes(out), base)
    # under LLM.int8 the lattice is float16: a bf16 step past a float16 edge may round back
    tight = not (case == "bnb_int8" and dtype == "bf16")
    assert changed == len(idx) > 0 if tight else changed > 0


def test_half_width_law_for_uniform_positions():
    """docs/design.md §5 sanity law: Gaussian noise with sigma = h changes ~39% of codes."""
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
