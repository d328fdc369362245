"""Synthetic Llama-shaped checkpoints for benchmarks: random bf16 weights written one tensor
at a time (resident memory stays near one tensor), sharded like `save_pretrained` with a
`model.safetensors.index.json`. Not for the test suite: an 8B checkpoint is 16 GB.

    python bench/synthetic.py OUT_DIR --geometry llama3_8b [--tokenizer DIR] [--shard-gb 5]

Geometries: llama3_8b (Llama-3-8B: hidden 4096, 32 layers, 32/8 heads, intermediate 14336,
vocab 128256, untied) and llama3_1b (Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads,
intermediate 8192, tied). `--tokenizer` copies a tokenizer's files and takes its vocabulary
size (the embedded model's, for a pipeline run offline).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from qexp.checkpoint.safetensors_io import write_streaming, write_tensor
from qexp.core.io import atomic_write_json

GEOMETRIES = {
    "llama3_8b": dict(
        hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, tied=False, theta=5e5
    ),
    "llama3_1b": dict(
        hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tied=True, theta=5e5
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def entries(g: dict) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor, in the order save_pretrained writes a Llama."""
    h, kv, inter = g["hidden"], g["kv"], g["inter"]
    hd = h // g["heads"]
    out = [("model.embed_tokens.weight", [g["vocab"], h])]
    for i in range(g["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "mlp.down_proj.weight", [h, inter]),
            (p + "mlp.gate_proj.weight", [inter, h]),
            (p + "mlp.up_proj.weight", [inter, h]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "self_attn.k_proj.weight", [kv * hd, h]),
            (p + "self_attn.o_proj.weight", [h, h]),
            (p + "self_attn.q_proj.weight", [h, h]),
            (p + "self_attn.v_proj.weight", [kv * hd, h]),
        ]
    out.append(("model.norm.weight", [h]))
    if not g["tied"]:
        out.append(("lm_head.weight", [g["vocab"], h]))
    return out


def _tensor(name: str, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    """Norm weights near 1, matrices N(0, 1/fan_in) (the scale of trained Llama weights)."""
    if len(shape) == 1:
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    std = 0.02 if "embed" in name or "lm_head" in name else 1 / math.sqrt(shape[1])
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def write_checkpoint(
    dst: Path, geometry: str, tokenizer: Path | None = None, shard_gb: float = 5.0, seed: int = 0
) -> dict:
    """Write the checkpoint; returns its parameter count, bytes, shards and seconds."""
    g = dict(GEOMETRIES[geometry])
    if tokenizer is not None:
        tok = json.loads((tokenizer / "config.json").read_text())
        g["vocab"] = tok["vocab_size"]
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    limit = int(shard_gb * 2**30)
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in entries(g):
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

        def body(out, shard=shard) -> None:
            for name, shape in shard:
                write_tensor(out, _tensor(name, shape, gen))

        write_streaming(dst / fname, [(n, "BF16", s) for n, s in shard], body, {"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
    total = sum(2 * math.prod(s) for sh in shards for _, s in sh)
    atomic_write_json(
        dst / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": g["hidden"],
        "num_hidden_layers": g["layers"],
        "num_attention_heads": g["heads"],
        "num_key_value_heads": g["kv"],
        "head_dim": g["hidden"] // g["heads"],
        "intermediate_size": g["inter"],
        "vocab_size": g["vocab"],
        "tie_word_embeddings": g["tied"],
        "rope_theta": g["theta"],
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    if tokenizer is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer / f).is_file():
                shutil.copy2(tokenizer / f, dst / f)
        tok = json.loads((tokenizer / "config.json").read_text())
        config.update({k: tok[k] for k in ("bos_token_id", "eos_token_id") if k in tok})
    atomic_write_json(dst / "config.json", config)
    return {
        "geometry": geometry,
        "params": total // 2,
        "bytes": total,
        "shards": len(shards),
        "write_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dst", type=Path)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama3_8b")
    p.add_argument("--tokenizer", type=Path, help="a checkpoint dir whose tokenizer to copy")
    p.add_argument("--shard-gb", type=float, default=5.0)
    a = p.parse_args()
    print(json.dumps(write_checkpoint(a.dst, a.geometry, a.tokenizer, a.shard_gb)))


if __name__ == "__main__":
    main()
