"""attack=encrypt: exact preservation (float64) over random tiny architectures, streaming."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from qexp.attacks.encrypt import Encrypt, block_size, hadamard
from qexp.core.errors import ConfigError
from qexp.core.geometry import SUPPORTED, geometry
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from qexp.tools.encrypt import encrypt_checkpoint, load_attack, main
from tests.conftest import ROOT, subject


def tiny(arch, heads=4, kv=2, head_dim=16, layers=3, bias=False, seed=0, eps=1e-6):
    extra = {"attention_bias": True} if bias and arch in ("llama", "mistral") else {}
    cfg = AutoConfig.for_model(
        arch,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=96,
        vocab_size=128,
        max_position_embeddings=256,
        rms_norm_eps=eps,
        **extra,
    )
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # larger weights than the default init, so the test has teeth
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def all_mech(**kw):
    base = dict(
        mechanisms=["a", "b", "c"],
        kappa_one_layers=1,
        kappa_one_min_spacing=1,
        rho=0.5,
        spikes=1,
        group_size=8,
        mlp=True,
        b_every=1,
    )
    base.update(kw)
    return Encrypt(**base)


@pytest.mark.parametrize("seed", range(12))
def test_exact_preservation_float64_random_architectures(seed):
    rng = np.random.default_rng(seed)
    arch = SUPPORTED[seed % len(SUPPORTED)]
    kv = int(rng.choice([1, 2, 4]))
    heads = kv * int(rng.choice([1, 2, 3]))
    head_dim = int(rng.choice([32, 64, 128]))
    group = int(rng.choice([16, 32, 64, 128]))
    bias = bool(rng.integers(2))
    # q/k norms (Qwen3) remove the Q/K scale up to the RMSNorm eps; eps=0 makes that exact
    m = tiny(arch, heads, kv, head_dim, bias=bias, seed=seed, eps=0.0 if arch == "qwen3" else 1e-6)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    before = logits(m, ids)
    atk = all_mech(seed=seed, group_size=group)
    manifest = atk.apply(subject(m), ctx=None).info
    after = logits(m, ids)
    # transformers computes RMSNorm in float32 even for a float64 model; Q/K scaled into a
    # q/k norm (Qwen3) therefore meets float32 roundoff, every other path float64 roundoff
    tol = 1e-6 if arch == "qwen3" else 1e-9
    assert (after - before).abs().max() < tol * max(1.0, before.abs().max())
    # ... and the weights really changed
    assert manifest["layers"]["0"]["kappa"] is not None


def test_qwen3_with_real_eps_drifts_only_at_eps_level():
    m = tiny("qwen3", 4, 2, 32, eps=1e-6)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    before = logits(m, ids)
    all_mech(spike_gamma=[512.0, 512.0]).apply(subject(m), ctx=None)
    assert (logits(m, ids) - before).abs().max() < 1e-4


def test_each_mechanism_changes_the_right_tensors():
    base = tiny("qwen2", 4, 2, 16, layers=3)
    for mech, touched in [
        ("a", {"v_proj", "o_proj"}),
        ("b", {"v_proj", "o_proj"}),
        ("c", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ]:
        m = tiny("qwen2", 4, 2, 16, layers=3)
        Encrypt(mechanisms=[mech], kappa_one_layers=0, rho=1.0, group_size=8, b_every=1).apply(
            subject(m), None
        )
        diff = {
            n.split(".")[-2]
            for (n, p), (_, q) in zip(m.named_parameters(), base.named_parameters())
            if not torch.equal(p, q)
        }
        assert diff == touched, (mech, diff)


def test_a_conditioning_and_hadamard():
    h = hadamard(8)
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=torch.float64))
    assert block_size(64, 128) == 64 and block_size(64, 32) == 32 and block_size(96, 128) == 32
    geo = geometry(
        {
            "model_type": "llama",
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_size": 64,
            "intermediate_size": 32,
        }
    )
    keys = Encrypt(
        mechanisms=["a"], kappa=[30.0, 30.0], kappa_one_layers=2, kappa_one_min_spacing=3
    ).plan(geo)
    ones = [li for li, k in keys.items() if k.kappa == 1.0]
    assert len(ones) == 2 and ones[1] - ones[0] >= 3
    g = next(k for k in keys.values() if k.kappa == 30.0).heads[0].g
    s = torch.linalg.svdvals(g)
    assert float(s.max() / s.min()) == pytest.approx(30.0, rel=1e-6)


def test_needle_counts_and_seed_keys():
    geo = geometry(
        {
            "model_type": "llama",
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "hidden_size": 576,
            "intermediate_size": 1536,
        }
    )
    k0 = Encrypt().plan(geo)
    needles = [g for k in k0.values() for g in k.needles.values()]
    assert len(needles) == round(0.0625 * 90) + 4
    assert sum(g >= 256 for g in needles) == 4
    assert sum(k.eps is not None for k in k0.values()) == 10  # every 3rd of 30 layers
    k1 = Encrypt(seed=1).plan(geo)
    assert not torch.equal(k0[5].heads[0].g, k1[5].heads[0].g)
    k0b = Encrypt().plan(geo)
    assert torch.equal(k0[5].heads[0].g, k0b[5].heads[0].g)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ConfigError, match="llama, mistral, qwen2, qwen3"):
        geometry({"model_type": "gpt2"})


def test_bad_schedule_values(make_cfg):
    for over, key in [
        ("attack.mechanisms=[e]", "attack.mechanisms"),
        ("attack.kappa=[5,1]", "attack.kappa"),
        ("attack.rho=2", "attack.rho"),
        ("attack.band=[3]", "attack.band"),
    ]:
        with pytest.raises(ConfigError) as e:
            validate(make_cfg("attack=encrypt", over))
        assert e.value.key == key


def test_pipeline_reports_preservation(make_cfg, tmp_path):
    res = run(make_cfg("attack=encrypt", "attack.kappa_one_layers=0", "attack.rho=0.5"), tmp_path)
    fp = res.function_preservation
    assert fp["max_abs_logit_diff_fp32"] < 1e-4
    assert fp["top1_agreement_bf16"] >= 0.95
    assert {
        "kl_bf16",
        "max_abs_logit_diff_bf16",
        "original_bf16_vs_fp32_max_abs_logit_diff",
        "tolerance",
    } <= set(fp)
    body = json.loads((tmp_path / "results.json").read_text())
    assert body["function_preservation"] == fp
    manifest = json.loads((tmp_path / "attack_manifest.json").read_text())
    assert manifest["attack"]["mechanisms"] == ["a", "b", "c"]


def test_pipeline_stops_beyond_tolerance(make_cfg, tmp_path):
    from qexp.pipeline.preservation import PreservationError

    with pytest.raises(PreservationError, match="attack.tolerance"):
        run(
            make_cfg("attack=encrypt", "attack.kappa_one_layers=0", "attack.tolerance=1e-12"),
            tmp_path,
        )
    body = json.loads((tmp_path / "results.json").read_text())
    assert body["status"] == "failed" and "attacked" not in body["conditions"]


@pytest.fixture
def checkpoint(tmp_path):
    m = tiny("llama", 4, 2, 16, layers=4).to(torch.bfloat16)
    src = tmp_path / "src"
    m.save_pretrained(src, safe_serialization=True, max_shard_size="40KB")
    return m, src


def test_streaming_matches_in_memory_and_loads_in_transformers(checkpoint, tmp_path):
    m, src = checkpoint
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded input
    atk = load_attack(["kappa_one_layers=1", "group_size=8", "mlp=true", "rho=0.5"])
    encrypt_checkpoint(src, tmp_path / "out", atk, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    atk.apply(subject(m), None)
    for (n, p), (_, q) in zip(m.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    manifest = json.loads((tmp_path / "out" / "qexp_encrypt_manifest.json").read_text())
    assert manifest["tensors_changed"] > 0 and manifest["attack"]["seed"] == 0


def test_streaming_same_seed_same_bytes_other_seed_other_keys(checkpoint, tmp_path):
    _, src = checkpoint
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert (
            main(
                [
                    str(src),
                    str(tmp_path / name),
                    f"seed={seed}",
                    "kappa_one_layers=1",
                    "--no-progress",
                ]
            )
            == 0
        )
        outs[name] = {f.name: f.read_bytes() for f in sorted((tmp_path / name).iterdir())}
    assert outs["a"] == outs["b"]
    shard = next(
        k for k in outs["a"] if k.endswith(".safetensors") and outs["a"][k] != outs["c"][k]
    )
    assert shard
    va = load_file(tmp_path / "a" / shard)
    vc = load_file(tmp_path / "c" / shard)
    assert any(not torch.equal(va[k], vc[k]) for k in va)


def test_cli_errors(checkpoint, tmp_path):
    _, src = checkpoint
    p = subprocess.run(
        [sys.executable, "-m", "qexp.tools.encrypt", str(src), str(tmp_path / "o"), "rho=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert p.returncode == 2 and "attack.rho=3" in p.stderr
    assert main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    (tmp_path / "exists").mkdir()
    assert main([str(src), str(tmp_path / "exists")]) == 2


# ----------------------------------------------------------------- preset=exact (mechanism D)
def exact(**kw):
    return Encrypt(preset="exact", anchor_block=8, **kw)


@pytest.mark.parametrize("arch", SUPPORTED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_preset_is_bit_identical(arch, dtype):
    bias = arch in ("llama", "qwen2")  # q/k/v (and o) biases where the architecture has them
    m = tiny(arch, 4, 2, 32, layers=3, bias=bias).to(dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    before = logits(m, ids)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    exact().apply(subject(m), ctx=None)
    assert torch.equal(logits(m, ids), before)  # bit-identical, not merely close
    changed = {k.split(".")[-2] for k, v in m.state_dict().items() if not torch.equal(v, sd[k])}
    assert changed == {
        "input_layernorm", "post_attention_layernorm",
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip


def test_exact_anchors_are_powers_of_two_one_per_block():
    m = tiny("llama", 4, 2, 16, layers=2).float()
    w0 = m.model.layers[1].mlp.down_proj.weight.detach().clone()
    n0 = m.model.layers[1].input_layernorm.weight.detach().clone()
    exact(anchor_exp=[3, 5]).apply(subject(m), ctx=None)
    ratio = m.model.layers[1].mlp.down_proj.weight.detach() / w0  # [out, in]: per column
    col = ratio[0]
    assert torch.equal(ratio, col.expand_as(ratio))
    e = torch.log2(col)
    assert torch.equal(e, e.round()) and set(e.unique().tolist()) <= {0.0, 3.0, 4.0, 5.0}
    assert ((e > 0).reshape(-1, 8).sum(1) == 1).all()  # one anchor in every block of 8
    inv = n0 / m.model.layers[1].input_layernorm.weight.detach()
    assert ((torch.log2(inv) > 0).reshape(-1, 8).sum(1) == 1).all()


def test_exact_zeroes_the_rest_of_each_group_under_8_bit_rtn():
    from qexp.quantizers.rtn import rtn_fake_quant

    m = tiny("llama", 4, 2, 16, layers=2).float()
    before = m.model.layers[0].self_attn.o_proj.weight.detach().clone()
    exact().apply(subject(m), ctx=None)
    w = m.model.layers[0].self_attn.o_proj.weight.detach()
    anchor = (w / before).abs() > 1.5
    deq = rtn_fake_quant(w, 8, 32, symmetric=False)
    assert (deq[~anchor] == 0).float().mean() > 0.9  # 8 bits no longer resolve the others
    assert (rtn_fake_quant(before, 8, 32, symmetric=False) == 0).float().mean() < 0.05


def test_exact_preset_only_takes_exact_mechanisms():
    with pytest.raises(ConfigError) as e:
        Encrypt(preset="exact", mechanisms=["a", "d"])
    assert e.value.key == "mechanisms" and "exact" in str(e.value)
    with pytest.raises(ConfigError):
        Encrypt(preset="fast")
    with pytest.raises(ConfigError):
        Encrypt(preset="exact", anchor_exp=[2.5, 4])
    assert Encrypt().mechanisms == ["a", "b", "c"]
    assert Encrypt(mechanisms=["a", "d"]).mechanisms == ["a", "d"]  # paper: D composes with A


def test_a_with_d_stays_exact_in_float64():
    m = tiny("qwen2", 4, 2, 32, layers=3, bias=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    before = logits(m, ids)
    all_mech(mechanisms=["a", "b", "c", "d"], anchor_block=8).apply(subject(m), ctx=None)
    assert (logits(m, ids) - before).abs().max() < 1e-9 * max(1.0, before.abs().max())


def test_pipeline_exact_preset_reports_zero_bf16_drift(make_cfg, tmp_path):
    res = run(make_cfg("attack=encrypt", "attack.preset=exact"), tmp_path)
    fp = res.function_preservation
    assert fp["max_abs_logit_diff_bf16"] == 0.0 and fp["max_abs_logit_diff_fp32"] == 0.0
    assert fp["top1_agreement_bf16"] == 1.0 and fp["top1_agreement_fp32"] == 1.0
    assert fp["tolerance_bf16"] == 0.0
    manifest = json.loads((tmp_path / "attack_manifest.json").read_text())
    assert manifest["attack"]["mechanisms"] == ["d"]
    assert manifest["layers"]["0"]["anchors"]["mlp_out"] > 0


def test_bf16_tolerance_stops_the_run():
    from qexp.pipeline.preservation import PreservationError, check_drift

    report = {"max_abs_logit_diff_fp32": 0.0, "tolerance": 1e-2, "max_abs_logit_diff_bf16": 0.0}
    check_drift("attack", exact(), {**report, "tolerance_bf16": 0.0})  # exact: passes
    with pytest.raises(PreservationError, match="not exact in bf16"):
        check_drift(
            "attack", exact(), {**report, "max_abs_logit_diff_bf16": 0.25, "tolerance_bf16": 0.0}
        )


def test_streaming_exact_matches_in_memory_and_same_bytes(checkpoint, tmp_path):
    m, src = checkpoint
    for name in ("a", "b"):
        assert main([str(src), str(tmp_path / name), "preset=exact", "--no-progress"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)  # the user's path
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(loaded, ids), logits(plain, ids))
    load_attack(["preset=exact"]).apply(subject(m), None)
    for (n, p), (_, q) in zip(m.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    manifest = json.loads((tmp_path / "a" / "qexp_encrypt_manifest.json").read_text())
    assert manifest["attack"]["preset"] == "exact" and manifest["tensors_changed"] > 0
