"""Round-to-nearest quantizer: grid sizes, error bounds, ragged groups."""

import pytest
import torch

from qexp.quantizers.rtn import rtn_fake_quant


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_per_group_and_error_bound(bits, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    q = rtn_fake_quant(w, bits, 128, symmetric)
    groups_w, groups_q = w.reshape(16, 2, 128), q.reshape(16, 2, 128)
    levels = 2**bits - (1 if symmetric else 0)
    for i in range(16):
        for j in range(2):
            assert groups_q[i, j].unique().numel() <= levels
    if symmetric:
        step = groups_w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        step = (groups_w.amax(-1, keepdim=True) - groups_w.amin(-1, keepdim=True)) / (2**bits - 1)
    assert ((groups_q - groups_w).abs() <= step / 2 + 1e-5).all()
    assert not torch.equal(q, w)


def test_asymmetric_keeps_group_extremes_close():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]])
    q = rtn_fake_quant(w, 2, 4, symmetric=False)  # 4 levels per group of 4: exact here
    assert torch.allclose(q, w, atol=1e-6)


def test_ragged_last_group_gets_its_own_scale():
    w = torch.cat([torch.full((1, 128), 100.0), torch.linspace(-1, 1, 64)[None]], dim=1)
    q = rtn_fake_quant(w, 4, 128, symmetric=True)
    assert q.shape == w.shape
    # the last 64 columns are quantized with their own absmax (1.0), not the first group's
    assert (q[0, 128:] - w[0, 128:]).abs().max() <= 1.0 / 7 / 2 + 1e-6


def test_per_row_group():
    w = torch.randn(4, 96)
    q = rtn_fake_quant(w, 8, -1, symmetric=True)
    assert (q - w).abs().max() <= w.abs().max() / 127 / 2 + 1e-6
