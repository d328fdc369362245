"""Generation throughput: batched generation vs. a batch-1 loop on the same prompts.

Prints both and their ratio (goal >= 3x) and writes JSON. Same prompts, same greedy
settings, same model instance; the two runs are interleaved with a warm-up first.

    python bench/generation_throughput.py [--n 16] [--batch-size 8] [--model smollm2_135m]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from qexp.benchmarks.generation import GenerationSettings, generate
from qexp.core.context import RunContext
from qexp.core.io import atomic_write_json
from qexp.pipeline.spec import validate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generation.json")
    a = p.parse_args()

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"model={a.model}",
                f"benchmark.limit={a.n}",
                "logger=none",
                "progress=false",
            ],
        )
    spec = validate(cfg)
    ctx = RunContext.from_schema(spec.run, ROOT / "bench")
    lm = spec.model.load(ctx)
    prompts = [spec.benchmark.prompt(it, lm.tokenizer) for it in spec.benchmark.items()]
    stops = spec.benchmark.stop_strings
    generate(lm.model, lm.tokenizer, prompts[:2], GenerationSettings(4, 2), stops, False)

    def timed(bs: int) -> tuple[float, float, list]:
        t0 = time.perf_counter()
        gens, tok_s = generate(
            lm.model, lm.tokenizer, prompts, GenerationSettings(a.max_new_tokens, bs), stops, False
        )
        return time.perf_counter() - t0, tok_s, gens

    loop_s, loop_tok_s, loop_gens = timed(1)
    batch_s, batch_tok_s, batch_gens = timed(a.batch_size)
    agree = sum(x.text == y.text for x, y in zip(loop_gens, batch_gens)) / len(prompts)
    res = {
        "model": a.model,
        "n_prompts": len(prompts),
        "max_new_tokens": a.max_new_tokens,
        "batch_size": a.batch_size,
        "threads": __import__("torch").get_num_threads(),
        "loop_wall_s": round(loop_s, 2),
        "batched_wall_s": round(batch_s, 2),
        "loop_items_per_s": round(len(prompts) / loop_s, 3),
        "batched_items_per_s": round(len(prompts) / batch_s, 3),
        "loop_new_tokens_per_s": round(loop_tok_s, 2),
        "batched_new_tokens_per_s": round(batch_tok_s, 2),
        "speedup_wall": round(loop_s / batch_s, 2),
        "goal_speedup": 3.0,
        "outputs_identical_fraction": agree,
    }
    print(json.dumps(res, indent=2))
    atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
