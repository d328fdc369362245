"""defense=rotate (llm-compressor's SpinQuant / QuIP rotations) and the attacks adapted to it."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qexp.core.cache import MODEL_BLOB
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.defenses.rotate import Rotate
from qexp.pipeline.preservation import PreservationError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from qexp.quantizers.base import NoQuantizer
from tests.conftest import load_spec, subject

pytest.importorskip("llmcompressor")

IDS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
GAP = ["attack=gap", "attack.inject_steps=6", "attack.repair_steps=6", "attack.batch_size=4"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def loaded(make_cfg, tmp_path, *overrides):
    _, ctx, lm = load_spec(make_cfg, tmp_path, *overrides)
    return ctx, lm


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "spinquant"},
        {"method": "spinquant", "rotations": ["R1", "R2", "R4"]},
        {"method": "quip"},
        {"method": "quip", "rotations": ["v", "u"]},
        {"method": "quip", "transform_type": "random-matrix"},
    ],
)
def test_rotation_preserves_the_function(make_cfg, tmp_path, arch, cfg):
    ctx, lm = loaded(make_cfg, tmp_path, f"model={arch}", "+model.init_std=0.2")
    model = lm.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = logits(model)
    out = Rotate(**cfg).apply(subject(model), NoQuantizer(), ctx)
    drift = float((logits(out.model) - ref).abs().max())
    assert drift <= 1e-3  # the bound; hadamard ones stay far below
    if cfg.get("transform_type") != "random-matrix":
        assert drift < 1e-4
    q = dict(out.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(q, before["model.layers.0.self_attn.q_proj.weight"])
    assert out.info["online"] == sorted({"R4", "v", "u"} & set(out.info["rotations"]))


def test_seed_sets_the_rotation_and_unrotate_inverts_it(make_cfg, tmp_path):
    ctx, lm = loaded(make_cfg, tmp_path)
    models = [copy.deepcopy(lm.model) for _ in range(3)]
    for m, seed in zip(models, (1, 1, 2)):
        Rotate().rotate_model(m, seed)
    w = [dict(m.named_parameters())["model.layers.1.mlp.up_proj.weight"] for m in models]
    assert torch.equal(w[0], w[1]) and not torch.allclose(w[0], w[2])
    # rotated back: the same function, norms fused (all ones), embeddings untied
    ref = logits(lm.model)
    Rotate().unrotate_model(models[0], 1)
    assert float((logits(models[0]) - ref).abs().max()) < 1e-4
    assert torch.equal(models[0].model.norm.weight, torch.ones_like(models[0].model.norm.weight))
    assert models[0].lm_head.weight.data_ptr() != models[0].model.embed_tokens.weight.data_ptr()


def test_centring_embeddings_moves_an_rmsnorm_model_and_stops_the_run(make_cfg, tmp_path):
    """llm-compressor's SpinQuant centres embedding rows (exact under LayerNorm only)."""
    ctx, lm = loaded(make_cfg, tmp_path, "+model.init_std=0.2")
    ref = logits(lm.model)
    Rotate(center_embeddings=True).apply(subject(lm.model), NoQuantizer(), ctx)
    assert float((logits(lm.model) - ref).abs().max()) > 1e-2
    cfg = make_cfg("defense=rotate", "defense.center_embeddings=true", "+model.init_std=0.2")
    with pytest.raises(PreservationError, match="defense=rotate changed the function"):
        run(cfg, tmp_path / "run")


def test_adapted_attacks_compose(make_cfg):
    """Every attack takes `against=[rotate]`; encrypt drops its RMSNorm-fed anchor sites."""
    enc = validate(make_cfg("attack=encrypt_exact", "attack.against=[rotate]", "defense=rotate"))
    assert enc.attack.anchor_sites == ["mlp_out", "attn_out"] and not enc.attack.plain_output
    assert enc.attack.preservation_tolerance_bf16() is None  # rotating back is not bit-exact
    out = validate(make_cfg("attack=outlier", "attack.against=[rotate]", "defense=rotate"))
    assert set(out.attack.adaptations) == {"rotation"}
    with pytest.raises(ConfigError) as e:
        validate(
            make_cfg(
                "attack=encrypt_exact",
                "attack.anchor_sites=[attn_in]",
                "attack.against=[rotate]",
                "defense=rotate",
            )
        )
    assert e.value.key == "attack.against"


def test_refusals_name_the_key():
    with pytest.raises(ConfigError) as e:
        Rotate(method="quip", rotations=["R1"])
    assert e.value.key == "rotations"
    with pytest.raises(ConfigError) as e:  # not orthogonal: RMSNorm does not commute with it
        Rotate(transform_type="random-matrix")
    assert e.value.key == "transform_type"
    with pytest.raises(ConfigError) as e:
        Rotate(method="quip", center_embeddings=True)
    assert e.value.key == "center_embeddings"
    smollm = SimpleNamespace(
        hidden_size=576, num_attention_heads=9, head_dim=64, intermediate_size=1536
    )
    with pytest.raises(ConfigError) as e:
        Rotate(transform_type="hadamard").check_model(smollm)
    assert e.value.key == "defense.transform_type" and "[64, 576]" in e.value.allowed
    Rotate(transform_type="hadamard", block_size=64).check_model(smollm)
    with pytest.raises(ConfigError) as e:
        Rotate(block_size=48).check_model(smollm)
    assert e.value.key == "defense.block_size"


def test_online_rotations_need_a_quantizer_that_keeps_hooks(make_cfg):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("defense=rotate", "defense.method=quip", "quantizer=bnb_nf4"))
    assert e.value.key == "defense.rotations" and "rtn4" in e.value.allowed
    validate(make_cfg("defense=rotate", "defense.method=quip", "quantizer=rtn4"))
    validate(make_cfg("defense=rotate", "quantizer=bnb_nf4"))  # fused rotations: any quantizer
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*GAP, "attack.against=[rotate]", "defense=rotate", "defense.method=quip"))
    assert e.value.key == "attack.against"


def results(path):
    return json.loads((path / "results.json").read_text())


@pytest.mark.parametrize("method", ["spinquant", "quip"])
def test_pipeline_records_preservation_and_reuses_the_cache(make_cfg, tmp_path, method):
    """Rotated models are not stored as weights (untied embeddings, hooks), evaluations are."""
    cfg = ["attack=encrypt_exact", "defense=rotate", f"defense.method={method}", "quantizer=rtn4"]
    first = results_of(make_cfg, tmp_path / "a", tmp_path / "cache", cfg)
    second = results_of(make_cfg, tmp_path / "b", tmp_path / "cache", cfg)
    for branch in ("original", "attacked"):
        fp = first["defense_stats"][branch]["function_preservation"]
        assert fp["tolerance"] == 5e-2
    # the rotation alone (the original model) within the 1e-3; the encrypted model's
    # power-of-two anchors make fp32 rounding larger, still within the tolerance
    assert (
        first["defense_stats"]["original"]["function_preservation"]["max_abs_logit_diff_fp32"]
        <= 1e-3
    )
    assert first["conditions"] == second["conditions"]
    assert second["cache"]["attacked_q"] == "hit"
    for stage in ("defend", "quantize"):  # entries (info) stored, weights never
        entries = list((tmp_path / "cache" / "stages" / stage).iterdir())
        assert entries and not any((e / MODEL_BLOB).exists() for e in entries)


def results_of(make_cfg, run_dir, cache, overrides):
    run(make_cfg(*overrides, f"cache_dir={cache}", "cache=on"), run_dir)
    return results(run_dir)


def codes_kept(make_cfg, tmp_path, *overrides) -> float:
    """The fraction of trainable weights whose rtn4 grid value after the defender's rotation
    of the delivered model is the injected model's (the attack's aim, in its rotated basis),
    up to a millionth of the tensor's range: rotating back and forth moves a group's pinned
    extremes by an ulp, and its scale with them."""
    cache = tmp_path / "cache"
    spec = validate(
        make_cfg(
            *GAP, "quantizer=rtn4", "defense=rotate", *overrides, f"cache_dir={cache}", "cache=on"
        )
    )
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    out = spec.attack.run(subject(lm.model, lm.tokenizer), ctx)
    assert out.info["rotation"]["defense_seed"] == (
        "known" if spec.defense.seed is not None else "drawn at defense time"
    )
    defended = spec.defense.apply(subject(out.model, key="attacked"), spec.quantizer, ctx).model
    (entry,) = (cache / "stages" / "gap_inject").glob("*/tensors.safetensors")
    injected, params = load_file(str(entry)), dict(defended.named_parameters())
    q, same, total = spec.quantizer, 0, 0
    for n in out.info["trainable"]:
        got, aim = q.codes(params[n].detach()), q.codes(injected[n])
        same += int(((got - aim).abs() <= 1e-6 * aim.abs().max()).sum())
        total += injected[n].numel()
    return same / total


def test_gap_against_a_rotation_lands_only_with_the_seed(make_cfg, tmp_path):
    known = codes_kept(make_cfg, tmp_path / "known", "attack.against=[rotate]")
    assert known == 1.0
    drawn = codes_kept(make_cfg, tmp_path / "drawn", "attack.against=[rotate]", "defense.seed=null")
    assert drawn < 0.5


def test_adapted_attack_never_reuses_unrotated_sub_steps(make_cfg, tmp_path):
    """Against a rotation the attack trains a rotated model: its cached sub-steps (outlier's
    phase 1, keyed by the model state, not the adaptation) must not load the weights a plain
    run trained in the unrotated basis, and must hit on a second adaptive run."""
    fast = ["attack=outlier", "attack.phase1_steps=2", "attack.phase2_steps=2"]
    cache = [f"cache_dir={tmp_path / 'cache'}", "cache=on", "defense=rotate", "quantizer=rtn4"]

    def attack(*overrides):
        spec = validate(make_cfg(*fast, *cache, *overrides))
        ctx = RunContext.from_schema(spec.run, tmp_path)
        lm = spec.model.load(ctx)
        return spec.attack.run(subject(lm.model, lm.tokenizer), ctx).info

    assert attack()["phase1"]["cache"] == "stored"
    adaptive = attack("attack.against=[rotate]")
    assert adaptive["phase1"]["cache"] == "stored" and adaptive["phase2"]["cache"] == "stored"
    again = attack("attack.against=[rotate]")
    assert again["phase1"]["cache"] == "hit" and again["phase2"]["cache"] == "hit"
