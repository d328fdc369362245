"""The prune group: llm-compressor's Wanda / SparseGPT and magnitude pruning, before Q."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pruners.base import measured_sparsity
from qexp.pruners.library import LibraryPruner
from tests.conftest import load_spec, subject

pytest.importorskip("llmcompressor")

CALIB = ["prune.calibration.samples=4", "prune.calibration.seq_len=32"]


def pruned(make_cfg, tmp_path, *overrides):
    spec, ctx, lm = load_spec(make_cfg, tmp_path, *CALIB, *overrides)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out = spec.prune.prune(subject(lm.model, lm.tokenizer), ctx)
    return spec, before, out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_the_mask_has_the_sparsity_asked(make_cfg, tmp_path, method, structure):
    spec, before, out = pruned(
        make_cfg, tmp_path, f"prune={method}", f"prune.mask_structure={structure}"
    )
    got = out.info["measured"]
    assert abs(got["sparsity"] - 0.5) <= 0.01 and got["min_layer"] >= 0.49
    assert got["n_m_pattern_holds"] if structure == "2:4" else "n_m_pattern_holds" not in got
    params = dict(out.model.named_parameters())
    for name, lin in spec.prune.pruned_linears(out.model):
        w, w0 = lin.weight.detach(), before[f"{name}.weight"]
        kept = w != 0
        if method != "sparsegpt":  # SparseGPT updates the kept weights; the others do not
            assert torch.equal(w[kept], w0[kept])
        if method == "magnitude" and structure == "unstructured":  # the smallest |w| went
            assert float(w0[~kept].abs().max()) <= float(w0[kept].abs().min())
    assert torch.equal(params["lm_head.weight"], before["lm_head.weight"])  # skipped


def test_a_mask_short_of_its_sparsity_stops_the_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(LibraryPruner, "magnitude_mask", lambda self, w: torch.ones_like(w))
    with pytest.raises(RuntimeError, match="the mask's sparsity is 0.0000"):
        pruned(make_cfg, tmp_path, "prune=magnitude")


def test_refusals_name_the_key():
    for kw, key in [
        ({"sparsity": 1.0}, "sparsity"),
        ({"mask_structure": "4:2"}, "mask_structure"),
        ({"mask_structure": "2:4", "sparsity": 0.6}, "sparsity"),
        ({"method": "owl"}, "method"),
    ]:
        with pytest.raises(ConfigError) as e:
            LibraryPruner(**kw)
        assert e.value.key == key
    odd = SimpleNamespace(hidden_size=576, intermediate_size=1536)
    LibraryPruner(mask_structure="2:4", sparsity=0.5).check_model(odd)
    with pytest.raises(ConfigError) as e:
        LibraryPruner(mask_structure="5:7", sparsity=5 / 7).check_model(odd)
    assert e.value.key == "prune.mask_structure"


def test_prune_then_quantize_composes_and_caches(make_cfg, tmp_path):
    """original_q = Q(P(M)): the quantized model keeps the mask; the second run hits."""
    cfg = [
        *CALIB,
        "prune=wanda",
        "prune.mask_structure=2:4",
        "quantizer=rtn4",
        "conditions=[original,original_q]",
        f"cache_dir={tmp_path / 'c'}",
        "cache=on",
    ]
    run(make_cfg(*cfg, "cache_weights=[prune,quantize]"), tmp_path / "a")
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert first["prune"]["original"]["measured"]["n_m_pattern_holds"]
    spec, ctx, lm = load_spec(make_cfg, tmp_path / "b", *cfg)
    (entry,) = {p.parent for p in (tmp_path / "c" / "stages" / "quantize").glob("*/model.*")}
    from safetensors.torch import load_file

    q = load_file(str(entry / "model.safetensors"))
    lins = [
        (
            n,
            SimpleNamespace(
                weight=q[f"{n}.weight"],
                in_features=q[f"{n}.weight"].shape[1],
                out_features=q[f"{n}.weight"].shape[0],
            ),
        )
        for n, _ in spec.prune.pruned_linears(lm.model)
    ]
    assert measured_sparsity(lins, (2, 4))["n_m_pattern_holds"]  # RTN keeps zeros at zero
    run(make_cfg(*cfg), tmp_path / "b")
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["conditions"] == first["conditions"] and second["cache"]["original_q"] == "hit"
