"""GPTQ-4 through GPTQModel vs llm-compressor on the embedded model: time, memory, perplexity.

Both back-ends get the same job: SmolLM2-135M, GPTQ 4-bit symmetric, group 64 (llm-compressor
refuses 128 on its 576-wide layers), no act-order, damp 0.01, the same calibration (calib=self,
16 x 128 tokens sampled from the model, seed 0). Each runs in its own child process; each row
reports the quantize wall time (calibration sampling included, the same for both), the peak
RSS after quantizing, and the reference-text perplexity before and after; then the ratios
llm-compressor / GPTQModel.

    python bench/gptq_backends.py [--group-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from qexp.core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"gptqmodel": "gptq4", "llmcompressor": "gptq4_llmc"}

CHILD = r"""
import json, math, resource, sys, time
from hydra import compose, initialize_config_dir
from qexp.pipeline.spec import validate
from qexp.core.context import RunContext
from qexp.data import reference_text
from qexp.benchmarks.metrics import token_nll

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

conf, quantizer, run_dir, group, threads = sys.argv[1:6]
overrides = ["logger=none", "progress=false", "seed=0", "threads=" + threads,
             "quantizer=" + quantizer, "quantizer.group_size=" + group,
             "quantizer.calibration.source=self", "quantizer.calibration.samples=16",
             "quantizer.calibration.seq_len=128"]
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    spec = validate(compose("config", overrides=overrides))
ctx = RunContext.from_schema(spec.run, run_dir)
t0 = time.perf_counter(); lm = spec.model.load(ctx); load = time.perf_counter() - t0
from qexp.core.plugin import Subject
rss_loaded = rss()
text = reference_text()
ppl_fp = math.exp(float(token_nll(lm.model, lm.tokenizer, text).mean()))
subject = Subject(lm.model, lm.tokenizer, "original", "bench")
t0 = time.perf_counter(); out = spec.quantizer.quantize(subject, ctx)
q = time.perf_counter() - t0
model, info = out.model, out.info
rss_q = rss()
ppl_q = math.exp(float(token_nll(model, lm.tokenizer, text).mean()))
print(json.dumps({"load_s": load, "quantize_s": q, "peak_rss_mb_after_load": rss_loaded,
                  "peak_rss_mb": rss_q, "ref_ppl_fp": ppl_fp, "ref_ppl_q": ppl_q,
                  "library": info["library"], "modules": info["modules"],
                  "kernel_vs_dequant_max_rel_err": info["kernel_vs_dequant_max_rel_err"]}))
"""


def run(quantizer: str, group: int, threads: int) -> dict:
    # GPTQModel keeps its own CPU worker count (it refuses fewer than 2 on CPU)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    args = [str(ROOT / "conf"), quantizer, str(ROOT / "outputs" / "bench_gptq_backends")]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args, str(group), str(threads)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{quantizer}: child failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per child")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gptq_backends.json")
    a = p.parse_args()
    rows = {}
    for backend, quantizer in BACKENDS.items():
        r = run(quantizer, a.group_size, a.threads)
        rows[backend] = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
        print(backend, rows[backend], flush=True)
    base, other = rows["gptqmodel"], rows["llmcompressor"]
    ratios = {
        k: round(other[k] / base[k], 3)
        for k in ("quantize_s", "peak_rss_mb", "ref_ppl_q")
        if base[k]
    }
    result = {
        "model": "smollm2_135m",
        "job": {
            "method": "gptq",
            "bits": 4,
            "group_size": a.group_size,
            "sym": True,
            "desc_act": False,
            "damp": 0.01,
            "calibration": {"source": "self", "samples": 16, "seq_len": 128, "seed": 0},
            "threads": a.threads,
        },
        "backends": rows,
        "ratio_llmcompressor_over_gptqmodel": ratios,
    }
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
