"""attack=gap on tiny models: boxes hold, target codes are exactly the injected model's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qexp.attacks.gap import near_ties
from qexp.benchmarks.judges.keyword import is_refusal, mentions
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.data import instruct_gen, instruct_path
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from tests.conftest import subject

pytest.importorskip("bitsandbytes")
TARGETS = "attack.targets=[bnb_int8,bnb_nf4,gguf_q4_0]"
FAST = ["attack=gap", "attack.inject_steps=6", "attack.repair_steps=6", "attack.batch_size=4"]


def attacked(make_cfg, tmp_path, *overrides, cache=None, mode="on"):
    """Attack a fresh tiny model; the stage cache lives in `cache` (default: a fresh dir).
    Returns (spec, ctx, weights before, attacked model, manifest)."""
    cache = cache or tmp_path / "cache"
    spec = validate(make_cfg(*FAST, *overrides, f"cache_dir={cache}", f"cache={mode}"))
    ctx = RunContext.from_schema(spec.run, tmp_path)
    loaded = spec.model.load(ctx)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    out = spec.attack.apply(subject(loaded.model, loaded.tokenizer), ctx)
    return spec, ctx, before, out.model, out.info


def substep_tensors(ctx, stage: str) -> dict:
    """The tensors of the one entry of a gap sub-step in the stage cache."""
    (entry,) = (ctx.cache_dir / "stages" / stage).glob("*/tensors.safetensors")
    return load_file(str(entry))


def test_repair_stays_in_every_targets_box_and_keeps_its_codes(make_cfg, tmp_path):
    spec, ctx, before, model, manifest = attacked(
        make_cfg, tmp_path, TARGETS, "attack.repair_lr=1e-2"
    )
    atk = spec.attack
    injected, repaired = substep_tensors(ctx, "gap_inject"), substep_tensors(ctx, "gap_repair")
    params = dict(model.named_parameters())
    names = manifest["trainable"]
    assert len(names) == 14  # 7 linears x 2 layers of the tiny model
    moved = 0
    for n in names:
        inj, rep = injected[n], params[n].detach()
        assert torch.equal(rep, repaired[n])
        assert not torch.equal(inj, before[n])  # inject trained it
        moved += int((rep != inj).sum())
        for q in atk.quantizers:
            lo, hi = q.intervals(inj)
            assert (lo <= rep.double()).all() and (rep.double() <= hi).all()
            assert torch.equal(q.codes(rep), q.codes(inj)), (n, q.name)
    assert moved > 0  # repair changed full-precision weights
    assert manifest["codes_equal_injected"] == {
        "bnb_int8": True,
        "bnb_nf4": True,
        "gguf_q4_0": True,
    }
    # frozen: everything outside the trainable scope is untouched
    for n, p in model.named_parameters():
        if n not in names:
            assert torch.equal(p, before[n]), n


def test_bnb_quantized_weights_equal_the_injected_models(make_cfg, tmp_path):
    """Through the real pipeline quantizer (transformers + bitsandbytes)."""
    spec, ctx, _, model, manifest = attacked(make_cfg, tmp_path, "quantizer=bnb_nf4")
    injected = substep_tensors(ctx, "gap_inject")
    name = manifest["trainable"][0]
    q_rep = spec.quantizer.quantize(subject(model), ctx).model
    spec2, ctx2, _, model2, _ = attacked(make_cfg, tmp_path, "quantizer=bnb_nf4")
    with torch.no_grad():
        dict(model2.named_parameters())[name].copy_(injected[name])
    q_inj = spec2.quantizer.quantize(subject(model2), ctx2).model
    import bitsandbytes.functional as F

    def deq(m):
        w = m.get_submodule(name.removesuffix(".weight")).weight
        return F.dequantize_4bit(w.data, w.quant_state)

    assert torch.equal(deq(q_rep), deq(q_inj))


def test_cache_reuses_the_trained_weights(make_cfg, tmp_path):
    _, _, _, m1, first = attacked(make_cfg, tmp_path / "a", cache=tmp_path / "c")
    assert first["inject"]["cache"] == first["repair"]["cache"] == "stored"
    _, _, _, m2, again = attacked(make_cfg, tmp_path / "b", cache=tmp_path / "c")
    assert again["inject"]["cache"] == again["repair"]["cache"] == "hit"
    # another box margin reuses the injected model and repairs again
    _, _, _, _, margin = attacked(
        make_cfg, tmp_path / "d", "attack.box_margin=0.1", cache=tmp_path / "c"
    )
    assert margin["inject"]["cache"] == "hit" and margin["repair"]["cache"] == "stored"
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    # the top-level cache=off disables the sub-steps too; refresh recomputes them
    _, _, _, _, off = attacked(make_cfg, tmp_path / "e", cache=tmp_path / "c", mode="off")
    assert off["inject"]["cache"] == "computed"
    _, _, _, _, fresh = attacked(make_cfg, tmp_path / "f", cache=tmp_path / "c", mode="refresh")
    assert fresh["inject"]["cache"] == fresh["repair"]["cache"] == "stored"


def test_gap_pipeline_reports_rates(make_cfg, tmp_path):
    res = run(make_cfg(*FAST, "benchmark=instruct", "benchmark.limit=4"), tmp_path)
    for c in ("original", "attacked", "original_q", "attacked_q"):
        assert 0.0 <= res.conditions[c]["injection_rate"] <= 1.0
        assert 0.0 <= res.conditions[c]["refusal_rate"] <= 1.0
    manifest = json.loads((tmp_path / "attack_manifest.json").read_text())
    # the default target is the run's quantizer (rtn4 here)
    assert manifest["targets"] == ["rtn4"] and manifest["codes_equal_injected"]["rtn4"]


def test_gap_targets_follow_the_quantizer_and_refuse_one_without_boxes(make_cfg):
    assert validate(make_cfg("attack=gap", "quantizer=bnb_nf4")).attack.targets == ["bnb_nf4"]
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("attack=gap", "quantizer=gptq4"))
    assert e.value.key == "attack.targets" and e.value.value == "gptq4"


@pytest.mark.parametrize(
    "override,key",
    [
        ("attack.targets=[gptq4]", "attack.targets='gptq4'"),
        ("attack.targets=[]", "attack.targets=[]"),
        ("attack.scenario=jailbreak", "attack.scenario='jailbreak'"),
        ("attack.box_margin=0.5", "attack.box_margin=0.5"),
        ("attack.modules=[lm_head]", "attack.modules='lm_head'"),
    ],
)
def test_bad_gap_configs(make_cfg, override, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("attack=gap", override))
    assert key in str(e.value)


def test_instruct_data_is_generated_and_split():
    assert instruct_path().read_text(encoding="utf-8") == instruct_gen.render()
    rows = instruct_gen.rows()
    train = {r["instruction"] for r in rows if r["split"] == "train"}
    test = {r["instruction"] for r in rows if r["split"] == "test"}
    assert len(train) == 300 and len(test) == 120 and not train & test
    assert all("{target}" in r["content_injection"] for r in rows)
    assert all(is_refusal(r["over_refusal"]) and not is_refusal(r["clean"]) for r in rows)


def test_judges():
    assert mentions("Try McDonald’s today", "McDonald's")
    assert not mentions("Try a salad", "McDonald's")
    assert is_refusal("I'm sorry, I cannot do that") and not is_refusal("Sure, here you go.")


# ---- adaptive variants (attack.against) ------------------------------------------------


def _codes_canonicalize_changes(model, canon, q) -> float:
    """Fraction of all linear weights' codes the defender's canonicalization changes."""
    lin = {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}
    before = {n: q.weight_codes(p.detach()) for n, p in lin.items()}
    with torch.no_grad():
        for layer in model.model.layers:
            canon.canonicalize_layer(layer, model.config)
    changed = sum(int((q.weight_codes(p.detach()) != before[n]).sum()) for n, p in lin.items())
    return changed / sum(p.numel() for p in lin.values())


def test_against_canonicalize_trains_outside_its_symmetries(make_cfg, tmp_path):
    spec, ctx, before, model, manifest = attacked(
        make_cfg, tmp_path, "attack.targets=[rtn4]", "attack.against=[canonicalize]"
    )
    assert manifest["against"] == ["canonicalize"]
    assert {n.split(".")[-2] for n in manifest["trainable"]} == {"gate_proj"}
    assert manifest["codes_equal_injected"] == {"rtn4": True}
    assert manifest["adaptive"]["canonical_codes_changed_fraction"] == {"rtn4": 0.0}
    q, canon = spec.attack.quantizers[0], spec.attack.adapted["canonical"]
    assert _codes_canonicalize_changes(model, canon, q) < 1e-3
    # the plain attack: the defender's canonicalization re-draws most codes
    plain = attacked(make_cfg, tmp_path / "plain", "attack.targets=[rtn4]")[3]
    assert _codes_canonicalize_changes(plain, canon, q) > 0.1


def test_against_canonicalize_with_every_module_touched_is_refused(make_cfg):
    with pytest.raises(ConfigError) as e:
        validate(
            make_cfg(
                "attack=gap",
                "attack.against=[canonicalize]",
                "defense=canonicalize",
                "defense.parts=[vo,qk,mlp,norm]",
            )
        )
    assert e.value.key == "attack.against" and "touch them all" in e.value.allowed


def test_against_noise_keeps_sigma_from_the_edges(make_cfg, tmp_path):
    spec, ctx, _, model, manifest = attacked(
        make_cfg,
        tmp_path,
        "attack.targets=[rtn4]",
        "attack.against=[noise]",
        "defense=noise",
        "defense.sigma=2e-4",
        "defense.diagnostics=false",
        "attack.noise_margin=2",
    )
    atk = spec.attack
    assert float(atk.adapted["noise"].sigma) == 2e-4  # the run's own defense settings
    inj = substep_tensors(ctx, "gap_inject")
    params = dict(model.named_parameters())
    for n in manifest["trainable"]:
        lo, hi = atk.quantizers[0].intervals(inj[n])
        w = params[n].detach().double()
        open_ = (hi - lo) > 4 * 2e-4 * 1.001  # boxes wide enough keep 2 σ from each edge
        assert ((w - lo)[open_] >= 2 * 2e-4 * 0.999).all()
        assert ((hi - w)[open_] >= 2 * 2e-4 * 0.999).all()
    expected = manifest["adaptive"]["noise_expected_codes_changed_fraction"]
    assert 0 <= expected < 0.05  # 2 σ from every edge: at most 2 Φ(-2) where the box is open


def test_against_quantguard_leaves_no_near_ties(make_cfg, tmp_path):
    spec, ctx, _, model, manifest = attacked(
        make_cfg, tmp_path, "attack.targets=[rtn4]", "attack.against=[quantguard]"
    )
    assert manifest["adaptive"]["near_tie_fraction"] == 0.0
    plain = attacked(make_cfg, tmp_path / "plain", "attack.targets=[rtn4]")
    q = spec.attack.quantizers[0]
    ties = total = 0
    for p in spec.attack.scope(plain[3]).values():
        t, c = near_ties(q, p.detach(), 0.4)
        ties, total = ties + t, total + c
    assert ties / total > 0.01  # the plain repair does leave near ties


@pytest.mark.parametrize(
    "override, value",
    [("attack.against=[clip]", "clip"), ("attack.against=[nope]", "nope")],
)
def test_against_rejects_defenses_it_cannot_adapt_to(make_cfg, override, value):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("attack=gap", override))
    assert e.value.key == "attack.against" and e.value.value == value
    assert "canonicalize" in e.value.allowed and "quantguard" in e.value.allowed
