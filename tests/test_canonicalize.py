"""defense=canonicalize: exact in float64, and it maps encrypted weights back to one form."""

from __future__ import annotations

import pytest
import torch

from qexp.attacks.encrypt import Encrypt
from qexp.defenses.canonicalize import Canonicalize
from qexp.quantizers.base import NoQuantizer
from tests.conftest import load_spec, subject


def loaded(make_cfg, tmp_path, *overrides):
    _, ctx, lm = load_spec(make_cfg, tmp_path, *overrides)
    return ctx, lm


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_mistral", "tiny_qwen3"])
def test_function_preserved_in_float64(make_cfg, tmp_path, arch):
    ctx, lm = loaded(make_cfg, tmp_path, f"model={arch}", "+model.init_std=0.2")
    model = lm.model.double()
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        Encrypt(
            mechanisms=["a", "b", "c"], mlp=True, rho=0.5, spikes=1, kappa_one_layers=0, b_every=1
        ).apply(subject(model), ctx)
        mid = model(input_ids=ids).logits
        Canonicalize(check_preservation=False).apply(subject(model), NoQuantizer(), ctx)
        after = model(input_ids=ids).logits
    # encrypt is exact up to the RMSNorm epsilon on Qwen3's q/k norms; canonicalize is exact
    assert float((mid - before).abs().max()) < (1e-4 if arch == "tiny_qwen3" else 1e-8)
    assert float((after - mid).abs().max()) < 1e-8


def per_head_absmax(model, d):
    out = {}
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        out[(i, "v")] = a.v_proj.weight.reshape(-1, d, a.v_proj.weight.shape[1]).abs().amax((1, 2))
        out[(i, "o")] = a.o_proj.weight.reshape(a.o_proj.weight.shape[0], -1, d).abs().amax((0, 2))
        out[(i, "q")] = a.q_proj.weight.reshape(-1, d, a.q_proj.weight.shape[1]).abs().amax((1, 2))
        out[(i, "up")] = layer.mlp.up_proj.weight.abs().amax()
    return out


def test_encrypted_and_original_canonicalize_to_the_same_ranges(make_cfg, tmp_path):
    ctx, a = loaded(make_cfg, tmp_path)
    _, b = loaded(make_cfg, tmp_path)
    d = a.model.config.head_dim
    enc = Encrypt(
        mechanisms=["a", "b", "c"],
        mlp=True,
        rho=0.5,
        spikes=1,
        kappa=[30.0, 30.0],
        kappa_one_layers=0,
        b_every=1,
    )
    enc.apply(subject(b.model), ctx)
    raw_orig, raw_enc = per_head_absmax(a.model, d), per_head_absmax(b.model, d)
    for m in (a.model, b.model):
        Canonicalize().apply(subject(m), NoQuantizer(), ctx)
    can_orig, can_enc = per_head_absmax(a.model, d), per_head_absmax(b.model, d)
    worst_raw = max(float((raw_enc[k] / raw_orig[k]).log().abs().max()) for k in raw_orig)
    worst_can = max(float((can_enc[k] / can_orig[k]).log().abs().max()) for k in can_orig)
    assert worst_raw > 1.0  # encryption moved some head's range by > e×
    assert worst_can < 0.01  # canonical forms agree within 1%
    with torch.no_grad():  # and so do the weights themselves
        for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
            assert torch.allclose(p, q, atol=1e-4, rtol=1e-3), n


def test_fp32_preservation_is_reported(make_cfg, tmp_path):
    ctx, lm = loaded(make_cfg, tmp_path)
    from qexp.pipeline.preservation import measured

    d = Canonicalize()
    _, fp = measured(d, subject(lm.model, lm.tokenizer), lambda s: d.apply(s, NoQuantizer(), ctx))
    assert fp["max_abs_logit_diff_fp32"] < 1e-3 and fp["tolerance"] == 1e-2


def _rtn4_codes(model) -> dict:
    from qexp.quantizers.rtn import RTN

    q = RTN(bits=4, group_size=32)
    return {
        n: q.weight_codes(p.detach())
        for n, p in model.named_parameters()
        if n.endswith("proj.weight") and "layers" in n
    }


def _changed(a: dict, b: dict) -> float:
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_norm_part_undoes_every_exact_anchor(make_cfg, tmp_path, arch):
    """parts=[vo, qk, mlp, norm]: canonicalize(encrypt preset=exact (M)) has the codes of
    canonicalize(M); without `norm` the norm-fed anchors survive."""
    ctx, a = loaded(make_cfg, tmp_path, f"model={arch}")
    _, b = loaded(make_cfg, tmp_path, f"model={arch}")
    _, c = loaded(make_cfg, tmp_path, f"model={arch}")
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    full = Canonicalize(parts=["vo", "qk", "mlp", "norm"], check_preservation=False)
    with torch.no_grad():
        ref = b.model(input_ids=ids).logits
        Encrypt(preset="exact").apply(subject(a.model), ctx)
        Encrypt(preset="exact").apply(subject(c.model), ctx)
        full.apply(subject(a.model), NoQuantizer(), ctx)
        full.apply(subject(b.model), NoQuantizer(), ctx)
        Canonicalize(check_preservation=False).apply(subject(c.model), NoQuantizer(), ctx)
        drift = float((b.model(input_ids=ids).logits - ref).abs().max())
    assert drift < 1e-3  # the norm balance preserves the function (fp32)
    assert _changed(_rtn4_codes(a.model), _rtn4_codes(b.model)) < 1e-3
    assert _changed(_rtn4_codes(c.model), _rtn4_codes(b.model)) > 0.3


def test_encrypt_against_canonicalize_keeps_what_it_cannot_undo(make_cfg):
    from qexp.core.errors import ConfigError
    from qexp.pipeline.spec import validate

    spec = validate(
        make_cfg("attack=encrypt", "attack.preset=exact", "attack.against=[canonicalize]")
    )
    assert spec.attack.mechanisms == ["d"]
    assert spec.attack.anchor_sites == ["attn_in", "mlp_in"]  # vo and mlp undo the others
    spec = validate(
        make_cfg(
            "attack=encrypt",
            "attack.preset=exact",
            "attack.against=[canonicalize]",
            "defense=canonicalize",
            "defense.parts=[vo]",
        )
    )
    assert spec.attack.anchor_sites == ["attn_in", "mlp_in", "mlp_out"]  # the run's parts
    for extra in (["attack.preset=paper"], ["attack.preset=exact", "defense.parts=[vo,mlp,norm]"]):
        with pytest.raises(ConfigError) as e:
            validate(
                make_cfg(
                    "attack=encrypt",
                    "attack.against=[canonicalize]",
                    "defense=canonicalize",
                    *extra,
                )
            )
        assert e.value.key == "attack.against" and "undo every one" in e.value.allowed


# ------------------------------------------------------- streaming (qexp-canonicalize)
def _tiny_checkpoint(tmp_path, arch="llama", dtype=torch.bfloat16, bias=False):
    from tests.test_encrypt import tiny

    m = tiny(arch, 4, 2, 16, layers=3, bias=bias).to(dtype)
    src = tmp_path / f"src_{arch}_{str(dtype)[6:]}"
    m.save_pretrained(src, safe_serialization=True, max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded: a layer spans shards
    return m, src


@pytest.mark.parametrize(
    "arch,parts,bias,per_layer",
    [  # tensors rewritten per layer
        ("llama", ["vo", "qk", "mlp"], True, 9),  # v, v bias, o, q, q bias, k, k bias, up, down
        ("qwen2", ["vo", "qk", "mlp", "norm"], True, 12),  # + both norms and gate
        ("qwen3", ["vo", "qk", "mlp"], False, 4),  # q/k norms: no qk part; v, o, up, down
    ],
)
def test_streaming_matches_in_memory_and_loads_in_transformers(
    tmp_path, arch, parts, bias, per_layer
):
    import json

    from transformers import AutoModelForCausalLM

    from qexp.tools.canonicalize import canonicalize_checkpoint, load_defense

    m, src = _tiny_checkpoint(tmp_path, arch, bias=bias)
    defense = load_defense([f"parts=[{','.join(parts)}]"])
    manifest = canonicalize_checkpoint(src, tmp_path / "out", defense, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    Canonicalize(parts=parts).apply(subject(m), NoQuantizer(), SimpleCtx)
    for (n, p), (_, q) in zip(m.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    on_disk = json.loads((tmp_path / "out" / "qexp_canonicalize_manifest.json").read_text())
    assert on_disk == manifest and manifest["defense"]["parts"] == parts
    assert manifest["tensors_changed"] == 3 * per_layer


class SimpleCtx:
    progress = False


def test_streaming_undoes_a_streamed_encrypt(tmp_path):
    from qexp.checkpoint.reader import Checkpoint
    from qexp.tools.canonicalize import canonicalize_checkpoint, load_defense
    from qexp.tools.encrypt import encrypt_checkpoint, load_attack

    _, src = _tiny_checkpoint(tmp_path, dtype=torch.float32)
    atk = load_attack(["kappa_one_layers=0", "group_size=8", "mlp=true", "rho=0.5", "b_every=1"])
    encrypt_checkpoint(src, tmp_path / "enc", atk, progress=False)
    defense = load_defense([])
    canonicalize_checkpoint(src, tmp_path / "can", defense, progress=False)
    canonicalize_checkpoint(tmp_path / "enc", tmp_path / "enc_can", defense, progress=False)
    with (
        Checkpoint(tmp_path / "can") as a,
        Checkpoint(tmp_path / "enc_can") as b,
        Checkpoint(tmp_path / "enc") as e,
    ):
        moved = max(float((e.get(n) - a.get(n)).abs().max()) for n in a.names)
        back = max(float((b.get(n) - a.get(n)).abs().max()) for n in a.names)
    assert moved > 0.1  # encrypt moved the weights
    assert back < 1e-4  # the canonical forms of M and encrypt(M) agree


def test_streaming_cli_errors_and_same_bytes(tmp_path):
    import subprocess
    import sys

    from qexp.tools.canonicalize import main
    from tests.conftest import ROOT

    _, src = _tiny_checkpoint(tmp_path)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "qexp.tools.canonicalize",
            str(src),
            str(tmp_path / "o"),
            "parts=[xy]",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert (
        p.returncode == 2 and "defense.parts='xy'" in p.stderr and "vo, qk, mlp, norm" in p.stderr
    )
    assert not (tmp_path / "o").exists()
    assert main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    outs = []
    for name in ("a", "b"):
        assert main([str(src), str(tmp_path / name), "--no-progress"]) == 0
        outs.append({f.name: f.read_bytes() for f in sorted((tmp_path / name).iterdir())})
    assert outs[0] == outs[1]
    assert main([str(src), str(tmp_path / "a")]) == 2  # never overwritten
