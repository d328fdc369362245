"""Wall time and peak RSS of each quantizer on the embedded model, one child process each.

The baseline in the same run is `quantizer=none` (load + the same bookkeeping, no
quantization): each row reports its own numbers and the ratio to that baseline.

    python bench/quantize.py [--quantizers rtn4,bnb_nf4,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from qexp.core.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
ALL = ["none"] + sorted(
    p.stem for p in (ROOT / "conf" / "quantizer").glob("*.yaml") if p.stem != "none"
)
# the embedded model's 576-wide layers need group 64 for AWQ and for llm-compressor's GPTQ
EMBEDDED_OVERRIDES = {
    "awq4": ["quantizer.group_size=64"],
    "awq4_llmc": ["quantizer.group_size=64"],
    "gptq4_llmc": ["quantizer.group_size=64"],
    # AutoRound's default 200 steps take ~45 min on 2 cores; its "light" setting
    "autoround4": ["quantizer.iters=50"],
    "autoround8": ["quantizer.iters=50"],
}

CHILD = r"""
import json, resource, sys, time
from hydra import compose, initialize_config_dir
from qexp.pipeline.spec import validate
from qexp.core.context import RunContext
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    spec = validate(compose("config", overrides=["logger=none", "progress=false",
                                                 "quantizer=" + sys.argv[2], *sys.argv[4:]]))
ctx = RunContext.from_schema(spec.run, sys.argv[3])
t0 = time.perf_counter(); lm = spec.model.load(ctx); load = time.perf_counter() - t0
from qexp.core.plugin import Subject
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
subject = Subject(lm.model, lm.tokenizer, "original", "bench")
t0 = time.perf_counter(); spec.quantizer.quantize(subject, ctx)
q = time.perf_counter() - t0
print(json.dumps({"load_s": load, "quantize_s": q, "peak_rss_mb_after_load": rss_loaded,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantizers", default=",".join(ALL))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize.json")
    a = p.parse_args()
    names = a.quantizers.split(",")
    if "none" not in names:
        names.insert(0, "none")
    rows = {}
    for q in names:
        out = (
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(ROOT / "conf"),
                    q,
                    str(ROOT / "outputs"),
                    *EMBEDDED_OVERRIDES.get(q, []),
                ],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rows[q] = {k: round(v, 3) for k, v in json.loads(out).items()}
        rows[q]["overrides"] = EMBEDDED_OVERRIDES.get(q, [])
        print(q, rows[q], flush=True)
    base = rows["none"]
    for r in rows.values():
        r["peak_rss_ratio_vs_none"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
    atomic_write_json(a.out, {"model": "smollm2_135m", "quantizers": rows})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
