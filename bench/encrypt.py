"""Streaming encryption: time vs. a plain read+write copy, and peak RSS on a 1B checkpoint.

1. The embedded model's converted checkpoint (fp32): encrypt_checkpoint (what
   `python -m qexp.encrypt` runs) vs. a byte copy through the same streaming writer (atomic,
   fsync) and `shutil.copyfile`; in-process, interleaved, median of --repeats. Goal <= 1.5x.
2. A synthetic Llama-shaped checkpoint of >= 1B parameters (bf16, random, written tensor by
   tensor) encrypted in a child process; its peak RSS (goal < 1.5 GB) against the peak RSS
   of a child that only imports qexp.encrypt.

    python bench/encrypt.py [--params-b 1.0] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qexp.encrypt import encrypt_checkpoint, load_attack
from qexp.io import atomic_write_json
from qexp.safetensors_io import stream_transform, write_streaming, write_tensor

ROOT = Path(__file__).resolve().parents[1]


def child_peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process (a fresh process each time)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    return float(out[0]), float(out[1])


def synthetic_llama(dst: Path, params_b: float) -> int:
    """Write a random bf16 Llama checkpoint with about `params_b` billion parameters."""
    hidden, heads, kv, inter, vocab = 2048, 16, 8, 5632, 32000
    hd = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * hd + 3 * hidden * inter + 2 * hidden
    layers = max(1, math.ceil((params_b * 1e9 - 2 * vocab * hidden) / per_layer))
    entries = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [
            (p + "self_attn.q_proj.weight", [hidden, hidden]),
            (p + "self_attn.k_proj.weight", [kv * hd, hidden]),
            (p + "self_attn.v_proj.weight", [kv * hd, hidden]),
            (p + "self_attn.o_proj.weight", [hidden, hidden]),
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
            (p + "input_layernorm.weight", [hidden]),
            (p + "post_attention_layernorm.weight", [hidden]),
        ]
    entries += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    gen = torch.Generator().manual_seed(0)

    def body(out) -> None:
        for _, shape in entries:
            write_tensor(out, (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16))

    dst.mkdir(parents=True)
    write_streaming(
        dst / "model.safetensors", [(n, "BF16", s) for n, s in entries], body, {"format": "pt"}
    )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
    }
    (dst / "config.json").write_text(json.dumps(config))
    return sum(torch.Size(s).numel() for _, s in entries)


def embedded_checkpoint() -> Path:
    """The converted embedded model (converting it on first use)."""
    from hydra import compose, initialize_config_dir

    from qexp.config import validate
    from qexp.context import RunContext

    with initialize_config_dir(config_dir=str(ROOT / "qexp" / "conf"), version_base="1.3"):
        spec = validate(compose("config", overrides=["logger=none"]))
    return spec.model.checkpoint_dir(RunContext.from_schema(spec.run, ROOT / "bench"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-b", type=float, default=1.0)
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encrypt.json")
    a = p.parse_args()
    res: dict = {}
    src = embedded_checkpoint()
    shard = src / "model.safetensors"
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as tmp:
        tmp = Path(tmp)
        attack = load_attack([])
        times: dict[str, list[float]] = {"plain": [], "stream": [], "encrypt": []}
        for i in range(a.repeats):  # interleaved, median of each
            t0 = time.perf_counter()
            shutil.copyfile(shard, tmp / f"copy{i}.safetensors")
            times["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stream_transform(
                shard, tmp / f"stream{i}.safetensors", lambda n, t: None, lambda n: False
            )
            times["stream"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            encrypt_checkpoint(src, tmp / f"enc{i}", attack, progress=False)
            times["encrypt"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        _, rss_enc = child_peak_rss_mb(
            [
                sys.executable,
                "-m",
                "qexp.encrypt",
                str(src),
                str(tmp / "enc_child"),
                "--no-progress",
            ]
        )
        _, rss_imp = child_peak_rss_mb([sys.executable, "-c", "import qexp.encrypt"])
        res["embedded"] = {
            "checkpoint_mb": round(shard.stat().st_size / 2**20, 1),
            "repeats": a.repeats,
            "plain_copy_s": round(med["plain"], 3),
            "stream_copy_s": round(med["stream"], 3),
            "encrypt_s": round(med["encrypt"], 3),
            "ratio_encrypt_vs_stream_copy": round(med["encrypt"] / med["stream"], 2),
            "ratio_encrypt_vs_plain_copy": round(med["encrypt"] / med["plain"], 2),
            "peak_rss_mb": round(rss_enc, 1),
            "goal_ratio": 1.5,
        }
        if not a.skip_synthetic:
            syn = tmp / "synthetic"
            t0 = time.perf_counter()
            n = synthetic_llama(syn, a.params_b)
            t_gen = time.perf_counter() - t0
            t_syn, rss_syn = child_peak_rss_mb(
                [
                    sys.executable,
                    "-m",
                    "qexp.encrypt",
                    str(syn),
                    str(tmp / "syn_enc"),
                    "--no-progress",
                ]
            )
            res["synthetic"] = {
                "params": n,
                "checkpoint_gb": round((syn / "model.safetensors").stat().st_size / 2**30, 2),
                "generate_s": round(t_gen, 1),
                "encrypt_s_incl_startup": round(t_syn, 1),
                "peak_rss_mb": round(rss_syn, 1),
                "import_only_peak_rss_mb": round(rss_imp, 1),
                "goal_peak_rss_mb": 1536,
            }
    res["threads"] = torch.get_num_threads()
    res["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(res, indent=2))
    atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
