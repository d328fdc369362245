"""attack=prune_gap on the tiny model: the sets, the repair box, and the library's masks."""

from __future__ import annotations

import json

import pytest
import torch

from qexp.audit.prune import PruneCheck
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from tests.conftest import subject

pytest.importorskip("llmcompressor")

FAST = [
    "attack=prune_gap",
    "attack.inject_steps=6",
    "attack.repair_steps=6",
    "attack.batch_size=4",
    "attack.calibration.samples=4",
    "attack.calibration.seq_len=32",
    "prune.calibration.samples=4",
    "prune.calibration.seq_len=32",
]


def attacked(make_cfg, tmp_path, *overrides):
    spec = validate(make_cfg(*FAST, *overrides))
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out = spec.attack.apply(subject(lm.model, lm.tokenizer), ctx)
    return spec, before, out


def test_magnitude_target_removes_every_repair_weight(make_cfg, tmp_path):
    """Magnitude needs no data: the box keeps every repair weight below the least kept |w|,
    so the library's mask removes all of them; weights outside both sets never move."""
    spec, before, out = attacked(make_cfg, tmp_path, "prune=magnitude", "attack.repair_lr=1e-2")
    masks = out.info["library_masks"]["magnitude"]
    assert masks["repair_removed"] == 1.0 and masks["injected_kept"] >= 0.95
    assert 0.04 <= out.info["repair_fraction"] <= 0.1 and out.info["inject_fraction"] == 0.5
    params = dict(out.model.named_parameters())
    moved = torch.cat([(params[n] != before[n]).reshape(-1) for n in out.info["trainable"]])
    assert 0.5 < float(moved.float().mean()) <= 0.5 + out.info["repair_fraction"] + 1e-9
    frozen = [n for n in params if n not in out.info["trainable"]]
    assert all(torch.equal(params[n], before[n]) for n in frozen)
    # the audit's prune check sees the attack in the weights alone, and not the clean model
    check = PruneCheck()
    linear = [n for n in out.info["trainable"] if params[n].dim() == 2]
    found = check.finish({n: check.visit(n, params[n].detach()) for n in linear})
    assert len(found["flagged"]) >= len(linear) // 2 and 0.5 in found["score"]["sparsity"]
    assert check.finish({n: check.visit(n, before[n]) for n in linear})["verdict"] == "clean"


@pytest.mark.parametrize("target", ["wanda", "sparsegpt"])
def test_calibrated_targets_with_the_users_own_data(make_cfg, tmp_path, target):
    """The library's Wanda / SparseGPT calibrate on data the attacker did not see."""
    _, _, out = attacked(make_cfg, tmp_path, f"prune={target}")
    masks = out.info["library_masks"][target]
    assert masks["repair_removed"] >= 0.9 and masks["injected_kept"] >= 0.8


def test_two_targets_and_n_m(make_cfg, tmp_path):
    _, _, out = attacked(
        make_cfg, tmp_path, "prune=wanda", "prune.mask_structure=2:4",
        "attack.targets=[wanda,magnitude]",
    )  # fmt: skip
    assert set(out.info["library_masks"]) == {"wanda", "magnitude"}
    assert out.info["targets"]["wanda"]["mask_structure"] == "2:4"  # the run's own settings
    assert out.info["targets"]["magnitude"]["mask_structure"] == "unstructured"


def test_refusals_name_the_key(make_cfg):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*FAST[:6]))  # prune=none: nothing to target
    assert e.value.key == "attack.targets"
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*FAST, "prune=wanda", "attack.repair_ratio=0.6"))
    assert e.value.key == "attack.repair_ratio"


def test_pipeline_prune_then_quantize(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "prune=magnitude", "quantizer=rtn4", "benchmark=instruct")
    run(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["conditions"]) == {"original", "attacked", "original_q", "attacked_q"}
    assert res["prune"]["attacked"]["measured"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    manifest = json.loads((tmp_path / "run" / "attack_manifest.json").read_text())
    assert manifest["library_masks"]["magnitude"]["repair_removed"] == 1.0


@pytest.mark.parametrize("scenario", ["over_refusal", "insecure_code"])
def test_scenarios_train_their_own_responses(make_cfg, tmp_path, scenario):
    """Over-refusal and insecure code (the coding set) inject their own responses: the
    inject loss falls and the library's magnitude mask still removes the repair."""
    _, _, out = attacked(make_cfg, tmp_path, "prune=magnitude", f"attack.scenario={scenario}")
    first, last = out.info["inject"]["inject_loss"]
    assert last < first
    assert out.info["scenario"] == scenario
    assert out.info["library_masks"]["magnitude"]["repair_removed"] == 1.0
