"""The interval geometry against what bitsandbytes stores on the user's path: the embedded
model's real layers saved in each load dtype and reloaded through transformers'
`BitsAndBytesConfig` (qexp's `quantizer=bnb_*`), for float32, bfloat16 and float16."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from qexp.quantizers.bnb import BitsAndBytes
from qexp.quantizers.gguf import GGUFQuant
from qexp.quantizers.intervals import lattice_step
from qexp.quantizers.rtn import RTN
from tests.conftest import embedded_first_last, subject

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("int8", "nf4", "fp4")


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory, cache_dir):
    """The embedded model cut to its first and last decoder layers (real weights) and its
    first 512 vocabulary rows (embeddings are not quantized; a small checkpoint saves and
    reloads fast)."""
    lm = embedded_first_last(cache_dir, tmp_path_factory.mktemp("load"))
    lm.model.resize_token_embeddings(512)
    return lm


def stored(model) -> dict[str, torch.Tensor]:
    """What the loaded bitsandbytes modules hold, per linear: codes, then scales (as floats)."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if type(mod).__name__ == "Linear8bitLt":
            out[name] = torch.cat([w.data.reshape(-1).float(), w.SCB.reshape(-1).float()])
        elif type(mod).__name__ == "Linear4bit":
            absmax = w.quant_state.absmax.reshape(-1).float()
            out[name] = torch.cat([w.data.reshape(-1).float(), absmax])
    return out


def through_transformers(lm, dtype, mode, tmp_path) -> dict[str, torch.Tensor]:
    from qexp.core.context import RunContext
    from tests.conftest import plain_ctx

    ctx = dataclasses.replace(plain_ctx(tmp_path), dtype=dtype)
    assert isinstance(ctx, RunContext)
    q = BitsAndBytes(name=f"bnb_{mode}", mode=mode)
    model = copy.deepcopy(lm.model).to(dtype)
    return stored(q.quantize(subject(model, lm.tokenizer), ctx).model)


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_codes_are_what_transformers_stores(two_layers, tmp_path, mode, dtype):
    dt = DTYPES[dtype]
    got = through_transformers(two_layers, dt, mode, tmp_path)
    q = BitsAndBytes(name=f"bnb_{mode}", mode=mode)
    model = copy.deepcopy(two_layers.model).to(dt)
    names = [n for n, _ in linears(model) if "lm_head" not in n]
    assert set(got) == set(names) and len(names) == 14
    for name in names:
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(q.codes(w), got[name]), (mode, dtype, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_points_inside_the_boxes_keep_every_stored_code(two_layers, tmp_path, mode, dtype):
    """Every weight of both layers moved at once to a random point of its box (edges
    included): transformers + bitsandbytes store exactly the same codes and scales."""
    dt = DTYPES[dtype]
    q = BitsAndBytes(name=f"bnb_{mode}", mode=mode)
    clean = through_transformers(two_layers, dt, mode, tmp_path / "clean")
    moved = copy.deepcopy(two_layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moved.model.to(dt)
        for name, lin in linears(moved.model):
            if "lm_head" in name:
                continue
            w = lin.weight.detach()
            lo, hi = q.intervals(w)
            assert ((lo <= w.double()) & (w.double() <= hi)).all(), name
            u = torch.rand(w.shape, generator=g, dtype=torch.float64)
            u = torch.where(u < 0.05, 0.0, torch.where(u > 0.95, 1.0, u))  # edges too
            v = (lo + (hi - lo) * u).to(dt)
            v = torch.where(v.double() < lo, lattice_step(v, 1), v)
            v = torch.where(v.double() > hi, lattice_step(v, -1), v)
            assert (v != w).float().mean() > 0.5, name  # really moved
            lin.weight.copy_(v)
    after = through_transformers(moved, dt, mode, tmp_path / "moved")
    assert set(after) == set(clean)
    for name in clean:
        assert torch.equal(after[name], clean[name]), (mode, dtype, name)


@pytest.mark.parametrize("q", [GGUFQuant(name="gguf_q4_0", qtype="q4_0"), RTN(name="rtn4")])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_gguf_and_rtn_boxes_on_the_embedded_layers(two_layers, q, dtype):
    """The same property for gguf-py's blocks and qexp's RTN on the real weights."""
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(1)
    for name, lin in linears(two_layers.model):
        if "lm_head" in name:
            continue
        w = lin.weight.detach().to(dt)
        lo, hi = q.intervals(w)
        assert ((lo <= w.double()) & (w.double() <= hi)).all(), name
        u = torch.rand(w.shape, generator=g, dtype=torch.float64)
        v = (lo + (hi - lo) * u).to(dt)
        v = torch.where(v.double() < lo, lattice_step(v, 1), v)
        v = torch.where(v.double() > hi, lattice_step(v, -1), v)
        assert torch.equal(q.codes(v), q.codes(w)), name
