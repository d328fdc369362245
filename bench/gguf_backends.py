"""GGUF k-quants on the embedded model: llama.cpp itself vs GPTQModel's re-implementation.

For each shared file type, the same fp32 weights go through `quantizer=gguf_<t>` (llama.cpp's
`ggml_quantize_chunk` with llama.cpp's type mix) and `quantizer=gptqmodel_q4_k_m
quantizer.gguf_type=<t>`; the baseline in the same run is llama.cpp. Reported per type: the
decoder linears whose de-quantized weights are identical, the fraction of equal weights,
reference perplexity and quantize time of each (ratios GPTQModel / llama.cpp).

    python bench/gguf_backends.py [--types q4_k_m,q6_k]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qexp.benchmarks.metrics import token_nll
from qexp.core.context import RunContext
from qexp.core.io import atomic_write_json
from qexp.core.plugin import Subject
from qexp.data import reference_text
from qexp.pipeline.spec import validate

ROOT = Path(__file__).resolve().parents[1]
TYPES = ["q4_k_s", "q4_k_m", "q5_k_m", "q6_k"]


def quantized(option: str, ftype: str, run_dir: Path) -> tuple[dict, float, float, dict]:
    """Decoder linear weights after quantization, ref ppl, seconds, the library's info."""
    key = "quantizer.ftype" if option.startswith("gguf_") else "quantizer.gguf_type"
    ovr = ["logger=none", "progress=false", "seed=0", f"quantizer={option}", f"{key}={ftype}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        spec = validate(compose("config", overrides=ovr))
    ctx = RunContext.from_schema(spec.run, run_dir)
    lm = spec.model.load(ctx)
    t0 = time.perf_counter()
    out = spec.quantizer.quantize(Subject(lm.model, lm.tokenizer, "original", "bench"), ctx)
    seconds = time.perf_counter() - t0
    ppl = math.exp(float(token_nll(out.model, lm.tokenizer, reference_text()).mean()))
    weights = {
        n: m.weight.detach().float().clone()
        for n, m in out.model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    }
    return weights, ppl, seconds, out.info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf_backends.json")
    a = p.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    run_dir = ROOT / "outputs" / "bench_gguf_backends"
    rows = {}
    for t in a.types.split(","):
        ref, ppl_l, s_l, info = quantized(f"gguf_{t}", t, run_dir)
        other, ppl_g, s_g, _ = quantized("gptqmodel_q4_k_m", t, run_dir)
        equal = {n: torch.equal(ref[n], other[n]) for n in ref}
        same = sum(int((ref[n] == other[n]).sum()) for n in ref)
        total = sum(ref[n].numel() for n in ref)
        rows[t] = {
            "llama_cpp": {"ref_ppl": round(ppl_l, 3), "quantize_s": round(s_l, 2)},
            "gptqmodel": {"ref_ppl": round(ppl_g, 3), "quantize_s": round(s_g, 2)},
            "linears_identical": f"{sum(equal.values())}/{len(equal)}",
            "weights_equal_fraction": round(same / total, 6),
            "llama_cpp_type_counts": info["type_counts"],
            "ratio_gptqmodel_over_llama_cpp": {
                "ref_ppl": round(ppl_g / ppl_l, 4),
                "quantize_s": round(s_g / s_l, 2),
            },
        }
        print(t, json.dumps(rows[t]), flush=True)
    atomic_write_json(a.out, {"model": "smollm2_135m", "baseline": "llama_cpp", "types": rows})


if __name__ == "__main__":
    main()
