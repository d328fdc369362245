"""Untrusted checkpoints (qexp/checkpoint/reader.py): every malformed input is one line and
exit 2 before any output exists; outputs are complete or absent; non-finite weights are a
finding in the audit and refused by the transforms; FP8 checkpoints are audited through
their scales. The property-based tests at the end generate malformed copies."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from qexp.audit.cli import main as audit_main
from qexp.checkpoint.reader import INDEX, Checkpoint
from qexp.checkpoint.safetensors_io import SafetensorsError
from qexp.core.errors import ConfigError
from qexp.models.loading import check_checkpoint_dir
from qexp.tools.canonicalize import main as canon_main
from qexp.tools.encrypt import main as encrypt_main
from tests.test_encrypt import tiny


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint in bf16, in several shards with an index."""
    src = tmp_path_factory.mktemp("clean") / "ckpt"
    m = tiny("llama", 4, 2, 16, layers=2).to(torch.bfloat16)
    m.save_pretrained(src, safe_serialization=True, max_shard_size="40KB")
    assert (src / INDEX).is_file() and len(list(src.glob("*.safetensors"))) > 2
    return src


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run(tool, argv: list[str]) -> tuple[int, str, str]:
    """A tool's main() in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool(argv)
    return code, out.getvalue(), err.getvalue()


def shard_of(ckpt: Path, tensor: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][tensor]


def rewrite(path: Path, edit) -> None:
    """Apply `edit(header) -> header` to a shard's JSON header, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def set_tensor(ckpt: Path, name: str, fn) -> None:
    """Replace one tensor's values in place (same dtype and shape)."""
    path = shard_of(ckpt, name)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors[name] = fn(tensors[name])
    save_file(tensors, path, metadata=meta)


Q = "model.layers.1.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def index_map(ckpt: Path, fn) -> None:
    body = json.loads((ckpt / INDEX).read_text())
    body["weight_map"] = fn(body["weight_map"])
    (ckpt / INDEX).write_text(json.dumps(body))


CASES = {
    "missing shard": lambda c: shard_of(c, Q).unlink(),
    "index entry leaving the directory": lambda c: index_map(
        c, lambda m: {**m, Q: "../x.safetensors"}
    ),
    "absolute index entry": lambda c: index_map(c, lambda m: {**m, Q: "/etc/x.safetensors"}),
    "config.json not JSON": lambda c: (c / "config.json").write_text("{not json"),
    "shape against config.json": lambda c: (c / "config.json").write_text(
        json.dumps({**json.loads((c / "config.json").read_text()), "hidden_size": 96})
    ),
    "zero-size embedding": lambda c: set_tensor(c, EMBED, lambda t: t[:0]),
    "overlapping byte ranges": lambda c: rewrite(
        shard_of(c, Q),
        lambda h: {
            k: (
                {**v, "data_offsets": [v["data_offsets"][0] - 2, v["data_offsets"][1] - 2]}
                if k == Q
                else v
            )
            for k, v in h.items()
        },
    ),
    "shard the index does not list": lambda c: shutil.copy(shard_of(c, Q), c / "extra.safetensors"),
    "tensor the index misplaces": lambda c: index_map(
        c, lambda m: {**m, Q: next(v for v in m.values() if v != m[Q])}
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_malformed_input_is_one_line_and_exit_2_before_any_output(clean, tmp_path, case):
    bad = copy(clean, tmp_path / "in")
    CASES[case](bad)
    for tool, extra in ((encrypt_main, ["preset=exact"]), (canon_main, [])):
        out = tmp_path / f"out_{tool.__module__}"
        code, _, err = run(tool, [str(bad), str(out), *extra, "--no-progress"])
        assert code == 2 and len(err.strip().splitlines()) == 1, (case, err)
        assert not out.exists(), case
    code, _, err = run(audit_main, [str(bad), "--out", str(tmp_path / "a"), "--no-progress"])
    assert code == 2 and len(err.strip().splitlines()) == 1, (case, err)
    with pytest.raises(ConfigError) as e:  # the pipeline's weight-free model check
        check_checkpoint_dir("model.id", bad)
    assert "\n" not in str(e.value)


def test_a_symlink_leaving_the_directory_needs_the_flag(clean, tmp_path):
    bad = copy(clean, tmp_path / "in")
    shard = shard_of(bad, Q)
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    argv = [str(bad), str(tmp_path / "o"), "preset=exact", "--no-progress"]
    code, _, err = run(encrypt_main, argv)
    assert code == 2 and "symlink leaving the directory" in err and "--allow-symlinks" in err
    code, out, _ = run(encrypt_main, [*argv, "--allow-symlinks"])
    assert code == 0 and "encrypted" in out
    assert not (tmp_path / "o" / shard.name).is_symlink()  # the output holds its own bytes


def test_outputs_are_complete_their_index_names_only_their_files_and_load(clean, tmp_path):
    from transformers import AutoModelForCausalLM

    src = copy(clean, tmp_path / "in")
    for tool, name, extra in ((encrypt_main, "enc", ["preset=exact"]), (canon_main, "canon", [])):
        out = tmp_path / name
        code, _, err = run(tool, [str(src), str(out), *extra, "--no-progress"])
        assert code == 0, err
        wmap = json.loads((out / INDEX).read_text())["weight_map"]
        assert set(wmap.values()) == {p.name for p in out.glob("*.safetensors")}
        assert all(v == Path(v).name for v in wmap.values())
        assert set(Checkpoint(out).entries) == set(Checkpoint(src).entries)
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        with safe_open(shard_of(out, Q), "pt") as f:
            assert torch.equal(m.state_dict()[Q], f.get_tensor(Q))


def test_non_finite_weights_are_an_audit_finding_and_refused_by_the_transforms(clean, tmp_path):
    bad = copy(clean, tmp_path / "in")

    def poison(t):
        t = t.clone()
        t[0, 0], t[1, 1], t[2, 2] = float("nan"), float("inf"), float("-inf")
        return t

    set_tensor(bad, Q, poison)
    code, out, err = run(audit_main, [str(bad), "--out", str(tmp_path / "a"), "--no-progress"])
    assert code == 1, err
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["checks"]["finite"]["nonfinite"] == {Q: 3}
    assert "finite" in report["suspicious_checks"] and f"{Q}: 3 non-finite" in out
    for tool, extra in ((encrypt_main, ["preset=exact"]), (canon_main, [])):
        code, _, err = run(tool, [str(bad), str(tmp_path / "o"), *extra, "--no-progress"])
        assert code == 2 and "non-finite" in err and Q in err and len(err.splitlines()) == 1
        assert not (tmp_path / "o").exists()
    code, _, err = run(audit_main, [str(clean), "--out", str(tmp_path / "c"), "--no-progress"])
    report = json.loads((tmp_path / "c" / "audit.json").read_text())
    assert (
        report["checks"]["finite"]["verdict"] == "clean"
        and not report["checks"]["finite"]["nonfinite"]
    )


def fp8_checkpoint(src: Path, dst: Path, block: bool) -> dict[str, torch.Tensor]:
    """`src` with every decoder linear stored as FP8 E4M3 and its scale beside it, as
    compressed-tensors (`weight_scale`, one per output row) or the fine-grained format
    (`weight_scale_inv`, one per 16 x 16 block here) store them; returns the de-scaled
    weights qexp-audit must see."""
    shutil.copytree(src, dst)
    want = {}
    for shard in dst.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        out = {}
        for k, t in tensors.items():
            if k.endswith("proj.weight"):
                w = t.float()
                if block:
                    s = w.abs().reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16).amax((1, 3))
                    s = s / 448
                    full = s.repeat_interleave(16, 0).repeat_interleave(16, 1)
                    scale_name = k + "_scale_inv"
                else:
                    s = w.abs().amax(1, keepdim=True) / 448
                    full, scale_name = s, k + "_scale"
                q = (w / full).to(torch.float8_e4m3fn)
                out[k], out[scale_name] = q, s.to(torch.bfloat16)
                want[k] = q.float() * s.to(torch.bfloat16).float().repeat_interleave(
                    *(16, 0) if block else (1, 0)
                ).repeat_interleave(*(16, 1) if block else (1, 1))
            else:
                out[k] = t
        save_file(out, shard, metadata={"format": "pt"})
    index = json.loads((dst / INDEX).read_text())
    for shard in dst.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (a safe_open handle)
                index["weight_map"][k] = shard.name
    (dst / INDEX).write_text(json.dumps(index))
    return want


@pytest.mark.parametrize("block", [False, True])
def test_an_fp8_checkpoint_passes_the_audit_read_through_its_scales(clean, tmp_path, block):
    ckpt = tmp_path / "fp8"
    want = fp8_checkpoint(clean, ckpt, block)
    c = Checkpoint(ckpt)
    for name, w in want.items():
        got, how = c.weight(name)
        assert how == "fp8 x scale" and torch.equal(got, w), name
    code, out, err = run(audit_main, [str(ckpt), "--out", str(tmp_path / "a"), "--no-progress"])
    assert code in (0, 1), err
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    finite = report["checks"]["finite"]
    assert finite["read_as"]["fp8 x scale"] == len(want) and not finite["not_interpreted"]
    assert report["checks"]["outlier"]["score"]["n_tensors"] > 0
    assert {"reparam", "gap", "outlier"} <= set(report["checks"])


# ------------------------------------------------------------------ property-based tests

# what a malformed copy may do to a valid sharded checkpoint
MUTATIONS = (
    "header_length",
    "header_bytes",
    "dtype",
    "shape",
    "offsets",
    "index_entry",
    "drop_shard",
    "truncate",
    "append",
    "config",
    "index_json",
)
NAMES = st.one_of(
    st.sampled_from(
        ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "..", "", "x.bin"]
    ),
    st.text(min_size=0, max_size=12),
)


def mutate(ckpt: Path, kind: str, data) -> None:
    """One malformation of `kind`, its details drawn by hypothesis."""
    shards = sorted(ckpt.glob("*.safetensors"))
    shard = data.draw(st.sampled_from(shards))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == "header_length":
        value = data.draw(st.integers(0, 2**64 - 1))
        shard.write_bytes(struct.pack("<Q", value) + raw[8:])
    elif kind == "header_bytes":
        pos = data.draw(st.integers(8, 8 + n - 1))
        byte = data.draw(st.integers(0, 255))
        shard.write_bytes(raw[:pos] + bytes([byte]) + raw[pos + 1 :])
    elif kind in ("dtype", "shape", "offsets"):
        header = json.loads(raw[8 : 8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        if kind == "dtype":
            header[name]["dtype"] = data.draw(
                st.sampled_from(["F32", "F16", "I8", "U64", "F8_E4M3", "Q4", "", "bf16"])
            )
        elif kind == "shape":
            header[name]["shape"] = data.draw(
                st.lists(st.integers(-3, 2**40), max_size=3) | st.just("64")
            )
        else:
            header[name]["data_offsets"] = data.draw(
                st.lists(st.integers(-10, 2**33), min_size=0, max_size=3)
            )
        blob = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    elif kind == "index_entry":
        body = json.loads((ckpt / INDEX).read_text())
        tensor = data.draw(st.sampled_from(sorted(body["weight_map"])))
        body["weight_map"][tensor] = data.draw(NAMES | st.sampled_from([s.name for s in shards]))
        (ckpt / INDEX).write_text(json.dumps(body))
    elif kind == "drop_shard":
        shard.unlink()
    elif kind == "truncate":
        shard.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "append":
        shard.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64)))
    elif kind == "config":
        cfg = json.loads((ckpt / "config.json").read_text())
        key = data.draw(
            st.sampled_from(["hidden_size", "num_hidden_layers", "vocab_size", "model_type"])
        )
        cfg[key] = data.draw(st.one_of(st.integers(-2, 4096), st.text(max_size=5), st.none()))
        (ckpt / "config.json").write_text(json.dumps(cfg))
    else:  # index_json
        (ckpt / INDEX).write_text(data.draw(st.sampled_from(["", "[]", "{}", '{"weight_map": 3}'])))


def tensors_of(ckpt: Path) -> dict[str, tuple]:
    """(dtype, shape, file) of every tensor, read with the format's own reader."""
    found = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (a safe_open handle)
                s = f.get_slice(k)
                found[k] = (s.get_dtype(), s.get_shape(), shard.name)
    return found


def complete(src: Path, out: Path) -> bool:
    """The output holds every tensor of the input (names, dtypes, shapes), and its index
    names exactly the files of the output that hold them (nothing outside it)."""
    want, got = tensors_of(src), tensors_of(out)
    wmap = json.loads((out / INDEX).read_text())["weight_map"]
    same = {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}
    return same and wmap == {k: v[2] for k, v in got.items()}


@settings(
    max_examples=int(os.environ.get("QEXP_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(kind=st.sampled_from(MUTATIONS), data=st.data())
def test_malformed_copies_end_in_exit_2_one_line_or_a_complete_output(
    clean, tmp_path_factory, kind, data
):
    """Each tool, on a generated malformed copy: exit 2 with one line and no output, or exit
    0 with an output holding every input tensor; never a traceback, never slow."""
    root = tmp_path_factory.mktemp("case")
    bad = copy(clean, root / "in")
    mutate(bad, kind, data)
    for tool, extra in ((encrypt_main, ["preset=exact"]), (canon_main, [])):
        out = root / f"out_{tool.__module__.rpartition('.')[2]}"
        start = time.monotonic()
        code, _, err = run(tool, [str(bad), str(out), *extra, "--no-progress"])
        assert time.monotonic() - start < 30, (kind, "slow")
        assert code in (0, 2), (kind, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and not out.exists(), (kind, err)
        else:
            assert complete(bad, out), kind
    code, _, err = run(audit_main, [str(bad), "--out", str(root / "a"), "--no-progress"])
    assert code in (0, 1, 2), (kind, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (kind, err)
    try:
        check_checkpoint_dir("model.id", bad)
    except ConfigError as e:
        assert "\n" not in str(e)
    with contextlib.suppress(SafetensorsError, ConfigError):
        Checkpoint(bad).close()


def test_fp8_and_unsigned_dtypes_read_as_the_format_writes_them(tmp_path):
    """F8_E4M3, F8_E5M2, U16, U32 and U64 (refused as unsupported before) decode to the
    values safetensors' own writer stored, through `get` and the mapped `view`."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": (torch.randn(8, 16, generator=g) * 50).to(torch.float8_e4m3fn),
        "b": torch.randn(4, 4, generator=g).to(torch.float8_e5m2),
        "c": torch.randint(0, 2**16, (5, 3), generator=g).to(torch.uint16),
        "d": torch.randint(0, 2**31, (7,), generator=g).to(torch.uint32),
        "e": torch.randint(0, 2**62, (3, 2), generator=g).to(torch.uint64),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    c = Checkpoint(tmp_path / "m.safetensors")
    for name, t in tensors.items():
        for got in (c.get(name), c.view(name)):
            assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))
