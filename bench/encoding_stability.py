"""How stable is each quantizer's encoding under tiny moves of the weights?

The question behind a gap-attack target: the attack moves weights inside boxes and needs
the library's codes to stay put. For the gap scope of the embedded model (the 28 linear
weights of layers 26-29), every tensor gets seeded Gaussian noise of `rel` times its own
standard deviation and is encoded again; reported per quantizer and noise level: the
fraction of integer codes and of groups of 64 that changed, and for SINQ the fraction of
64-column tiles whose Sinkhorn column scales moved by more than 5% (a discrete jump, not a
drift). Baseline in the same run: round-to-nearest with groups of 64 (qexp's `rtn4`, whose
codes are a local function of each weight), reported as ratios.

    python bench/encoding_stability.py [--rel 1e-4,1e-3,1e-2] [--layers 26,27,28,29]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qexp.core.context import RunContext
from qexp.core.io import atomic_write_json
from qexp.pipeline.spec import validate
from qexp.quantizers.library.hqq import HQQQuant
from qexp.quantizers.library.sinq import SINQQuant
from qexp.quantizers.rtn import RTN

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sinq_column_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per 64-column tile, the Sinkhorn column scales sinq divides by ([tiles, group])."""
    from sinq.sinkhorn import sinkhorn_log

    wh = w.to(torch.float16).float()
    return torch.stack(
        [sinkhorn_log(wh[:, t : t + group], 16)[1] for t in range(0, w.shape[1], group)]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rel", default="1e-4,1e-3,1e-2")
    p.add_argument("--layers", default="26,27,28,29")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/encoding_stability.json")
    a = p.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        spec = validate(compose("config", overrides=["logger=none", "progress=false"]))
    ctx = RunContext.from_schema(spec.run, ROOT / "outputs" / "bench_encoding_stability")
    model = spec.model.load(ctx).model
    layers = {int(x) for x in a.layers.split(",")}
    weights = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.split(".")[-1] in MODULES
        and n.startswith("model.layers.")
        and int(n.split(".")[2]) in layers
    }
    group = 64
    rtn, hqq, sinq = RTN(group_size=group), HQQQuant(group_size=group), SINQQuant(group_size=group)
    encoders = {
        "rtn4_g64": rtn.weight_codes,
        "hqq4_g64": lambda w: hqq._encode(w)[0],
        "sinq4_g64": lambda w: sinq._encode(w)[0],
    }
    clean = {k: {n: f(w) for n, w in weights.items()} for k, f in encoders.items()}
    scales = {n: sinq_column_scales(w, group) for n, w in weights.items()}
    gen = torch.Generator().manual_seed(0)
    rows: dict = {}
    for rel in (float(x) for x in a.rel.split(",")):
        noisy = {
            n: w + rel * w.std() * torch.randn(w.shape, generator=gen) for n, w in weights.items()
        }
        row: dict = {}
        for k, f in encoders.items():
            codes = groups = flipped = bad = 0
            for n, w in noisy.items():
                diff = f(w) != clean[k][n]
                codes += diff.numel()
                flipped += int(diff.sum())
                g = diff.reshape(w.shape[0], -1, group).any(-1)
                groups += g.numel()
                bad += int(g.sum())
            row[k] = {"codes_changed": flipped / codes, "groups_changed": bad / groups}
        jumps = tiles = 0
        for n, w in noisy.items():
            moved = (sinq_column_scales(w, group) / scales[n] - 1).abs().amax(-1) > 0.05
            jumps += int(moved.sum())
            tiles += moved.numel()
        row["sinq4_g64"]["tiles_with_column_scale_jump"] = jumps / tiles
        base = row["rtn4_g64"]["groups_changed"]
        for k in ("hqq4_g64", "sinq4_g64"):
            row[k]["groups_changed_vs_rtn"] = row[k]["groups_changed"] / base if base else None
        rows[f"{rel:g}"] = row
        print(f"rel={rel:g}", json.dumps(row), flush=True)
    atomic_write_json(
        a.out,
        {
            "model": "smollm2_135m",
            "tensors": len(weights),
            "layers": sorted(layers),
            "noise": "N(0, (rel * std(W))^2) per weight, seed 0",
            "baseline": "rtn4_g64",
            "levels": rows,
        },
    )


if __name__ == "__main__":
    main()
