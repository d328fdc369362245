"""attack=outlier, defense=clip and the audit's outlier check on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from qexp.audit.cli import main as audit_main
from qexp.core.blocks import block_ratio, block_top2
from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from qexp.quantizers.rtn import rtn_fake_quant
from tests.conftest import load_spec, subject

FAST = [
    "attack=outlier",
    "attack.phase1_steps=3",
    "attack.phase2_steps=3",
    "attack.batch_size=2",
]
UP = "model.layers.0.mlp.up_proj.weight"  # tiny_llama: 2 layers, the target at 3/4 depth is 0


def attacked(make_cfg, tmp_path, *overrides):
    spec, ctx, loaded = load_spec(
        make_cfg, tmp_path, *FAST, *overrides, f"cache_dir={tmp_path / 'cache'}", "cache=on"
    )
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    out = spec.attack.apply(subject(loaded.model, loaded.tokenizer), ctx)
    return spec, ctx, loaded, before, out


def test_one_outlier_per_block_and_block_quantizers_erase_the_rest(make_cfg, tmp_path):
    spec, ctx, loaded, before, out = attacked(make_cfg, tmp_path)
    m = out.info
    assert m["target_layer"] == 0 and m["modules"] == ["up_proj"]
    assert set(m["phase1"]) >= {"clean", "scenario", "kl", "cache"}
    params = dict(loaded.model.named_parameters())
    w = params[UP].detach()
    cols, first, second = block_top2(w, 32)
    assert (first >= 100 * second).all()  # every row-block has one outlier, x512 its max
    # phase 1 re-initialised the target MLP (std 1e-3): the rest of each block is tiny
    kept = torch.zeros_like(w, dtype=torch.bool).scatter_(1, cols, True)
    assert w[~kept].abs().max() < 0.01 < float(first.min())
    # full precision: the non-outlier weights are not zero
    assert (w[~kept] != 0).all()
    # RTN-4 (groups of 64: two outliers per group) erases every non-outlier weight
    deq = rtn_fake_quant(w, 4, 64, symmetric=False)
    assert (deq[~kept] == 0).all()
    assert (deq[kept] != 0).all()
    # the trainable scope moved, the frozen embedding did not
    assert any(not torch.equal(params[n], before[n]) for n in m["trainable"])
    assert torch.equal(params["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_gptq_erases_the_rest_of_the_target_blocks(make_cfg, tmp_path):
    pytest.importorskip("gptqmodel")
    spec, ctx, loaded, _, out = attacked(
        make_cfg, tmp_path, "quantizer=gptq4", "quantizer.group_size=32"
    )
    w = dict(loaded.model.named_parameters())[UP].detach().clone()
    cols, _, _ = block_top2(w, 32)
    q = spec.quantizer.quantize(subject(loaded.model, loaded.tokenizer, "attacked"), ctx).model
    deq = dict(q.named_parameters())[UP].detach()
    kept = torch.zeros_like(w, dtype=torch.bool).scatter_(1, cols, True)
    assert float((deq[~kept] == 0).float().mean()) >= 0.99
    assert float((w[~kept] == 0).float().mean()) < 0.01


def test_phases_come_from_the_stage_cache(make_cfg, tmp_path):
    _, _, first_model, _, first = attacked(make_cfg, tmp_path)
    _, _, again, _, second = attacked(make_cfg, tmp_path)
    assert first.info["phase1"]["cache"] != "hit" and first.info["phase2"]["cache"] != "hit"
    assert second.info["phase1"]["cache"] == "hit" and second.info["phase2"]["cache"] == "hit"
    a, b = first_model.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_relative_scale_is_a_multiple_of_the_second_largest(make_cfg, tmp_path):
    _, _, loaded, _, _ = attacked(make_cfg, tmp_path, "attack.relative=true", "attack.scale=300")
    r = block_ratio(dict(loaded.model.named_parameters())[UP].detach(), 32)
    assert torch.allclose(r, torch.full_like(r, 300.0), rtol=1e-4)


@pytest.mark.parametrize(
    "override,key",
    [
        ("attack.block_size=48", "attack.block_size"),
        ("attack.modules=[q_proj]", "attack.modules"),
        ("attack.layer=7", "attack.layer"),
        ("attack.scale=1", "attack.scale"),
    ],
)
def test_bad_outlier_configs_are_refused_before_weights(make_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(make_cfg(*FAST, override), tmp_path / "run")
    assert (
        not (tmp_path / "run" / "results.json").exists()
        or "complete" not in (tmp_path / "run" / "results.json").read_text()
    )


def test_clip_removes_injected_outliers_and_spares_clean_blocks(make_cfg, tmp_path):
    spec, ctx, loaded, _, _ = attacked(make_cfg, tmp_path)
    clip = validate(make_cfg("defense=clip", "defense.action=clamp", "defense.ratio=16")).defense
    model = loaded.model
    clean_before = model.model.layers[1].mlp.gate_proj.weight.detach().clone()
    res = clip.apply(subject(model, loaded.tokenizer), spec.quantizer, ctx)
    w = dict(model.named_parameters())[UP].detach()
    assert float(block_ratio(w, 32).max()) <= 1.0 + 1e-6  # clamped to the second largest
    assert torch.equal(model.model.layers[1].mlp.gate_proj.weight, clean_before)
    assert 0 < res.info["blocks_changed"] < res.info["blocks"]
    # the paper's variant: every block's largest |w| zeroed
    paper = validate(make_cfg("defense=clip")).defense
    info = paper.apply(subject(model, loaded.tokenizer), spec.quantizer, ctx).info
    assert info["blocks_changed"] == info["blocks"]
    assert info["weights_changed_fraction"] == pytest.approx(1 / 32)


def test_audit_flags_the_attacked_checkpoint_and_passes_the_clean_one(make_cfg, tmp_path):
    run(
        make_cfg(*FAST, "save_attacked=true", "conditions=[attacked]", "cache=off"),
        tmp_path / "run",
    )
    reports = {}
    for name, ckpt in (("attacked", tmp_path / "run" / "attacked"), ("clean", None)):
        if ckpt is None:
            spec, ctx, loaded = load_spec(make_cfg, tmp_path / "c")
            ckpt = tmp_path / "clean"
            loaded.model.save_pretrained(ckpt, safe_serialization=True)
        out = tmp_path / f"audit-{name}"
        rc = audit_main([str(ckpt), "--out", str(out), "--no-progress", "--no-plots"])
        reports[name] = (rc, json.loads((out / "audit.json").read_text())["checks"]["outlier"])
    rc, rep = reports["attacked"]
    assert rc == 1 and rep["verdict"] == "suspicious"
    assert rep["flagged"] == [UP] and rep["score"]["max_outlier_fraction"] == 1.0
    rc, rep = reports["clean"]
    assert rep["verdict"] == "clean" and rep["score"]["max_outlier_fraction"] == 0.0


def test_clip_group_that_does_not_divide_a_width_is_refused_before_weights(make_cfg, tmp_path):
    with pytest.raises(
        ConfigError, match=r"defense\.group_size=48 is not valid; allowed: a divisor"
    ):
        run(make_cfg("defense=clip", "defense.group_size=48"), tmp_path / "run")
    assert not (tmp_path / "run" / "generations").exists()


@pytest.mark.parametrize("clip", [[], ["defense.action=clamp", "defense.ratio=16"]])
def test_against_clip_pairs_outliers_that_survive_the_clip(make_cfg, tmp_path, clip):
    """Two equal outliers per block: a ratio-triggered clip never fires, the paper's clip of
    every block's max leaves the other one, and RTN-4 still erases the rest of the block."""
    spec, ctx, loaded, before, out = attacked(
        make_cfg, tmp_path, "attack.against=[clip]", "defense=clip", *clip
    )
    assert spec.attack.paired and spec.attack.adapted["outliers"] is spec.defense
    w = dict(loaded.model.named_parameters())[UP].detach()
    a = w.abs().reshape(w.shape[0], -1, 32)
    top = a.topk(3, dim=-1).values
    assert torch.equal(top[..., 0], top[..., 1])  # the pair: equal magnitude
    assert (top[..., 1] >= 100 * top[..., 2]).all()
    defended, hit = spec.defense.clipped(w)
    if clip:
        assert not hit.any() and torch.equal(defended, w)
    else:
        assert hit.all()  # one of each pair changed, the other still dominates its block
        d = defended.abs().reshape(w.shape[0], -1, 32).topk(2, dim=-1).values
        assert (d[..., 0] >= 100 * d[..., 1]).all()
    q = rtn_fake_quant(defended, bits=4, group_size=64, symmetric=False)
    kept = q.reshape(w.shape[0], -1, 32).ne(0).sum(-1)
    assert (kept <= 2).all()  # the quantizer erases everything but the outliers


def test_against_clip_needs_the_clips_group(make_cfg, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*FAST, "attack.against=[clip]", "defense=clip", "defense.group_size=64"))
    assert e.value.key == "attack.block_size" and "64" in e.value.allowed
