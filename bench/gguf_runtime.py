"""The .gguf file qexp writes, run by llama.cpp itself: perplexity against qexp's model.

`quantizer=gguf_<t> save_quantized=true` on the embedded model (optionally a stage-cache
attack checkpoint loaded on top), then the same reference tokens through llama.cpp's runtime
(llama-cpp-python, the `llamacpp` extra) and through qexp's de-quantized fp32 model. The
baseline in the same run is qexp; reported: both perplexities, their ratio, the mean
per-token |NLL difference| and how often the top-1 tokens agree.

    python bench/gguf_runtime.py [--ftype q4_k_m] [--weights attack/model.safetensors] \
        [--llama-python /other/venv/bin/python]

`--llama-python`: an interpreter that has llama_cpp (qexp's own by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from qexp.core.context import RunContext
from qexp.core.io import atomic_write_json
from qexp.core.plugin import Subject
from qexp.data import reference_text
from qexp.pipeline.spec import validate

ROOT = Path(__file__).resolve().parents[1]
LLAMA = """
import json, sys
import numpy as np
import llama_cpp
path, ids = sys.argv[1], json.load(open(sys.argv[2]))
llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + 8, logits_all=True, verbose=False)
llm.eval(ids)
s = np.array(llm.scores[: len(ids)], dtype=np.float64)
tok = llm.tokenize(open(sys.argv[3], encoding="utf-8").read().encode(), add_bos=False)
json.dump({"logp": (s - np.logaddexp.reduce(s, axis=1, keepdims=True)).tolist(),
           "tokens": tok[: len(ids)]}, sys.stdout)
"""


def per_token(logp: np.ndarray, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """NLL of each next token and the top-1 prediction at each position."""
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return nll, logp[:-1].argmax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ftype", default="q4_k_m")
    p.add_argument("--weights", type=Path, help="safetensors to load over the embedded model")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--llama-python", default=sys.executable)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf_runtime.json")
    a = p.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    with tempfile.TemporaryDirectory(prefix="qexp-gguf-runtime-") as tmp:
        tmp = Path(tmp)
        ovr = ["logger=none", "progress=false", f"quantizer=gguf_{a.ftype}"]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            spec = validate(compose("config", overrides=ovr))
        ctx = dataclasses.replace(RunContext.from_schema(spec.run, tmp), save_quantized=True)
        lm = spec.model.load(ctx)
        if a.weights:
            from safetensors.torch import load_file

            lm.model.load_state_dict(load_file(a.weights), strict=False)
        res = spec.quantizer.quantize(Subject(lm.model, lm.tokenizer, "bench", "bench"), ctx)
        ids = lm.tokenizer(reference_text())["input_ids"][: a.tokens]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
        ours = torch.log_softmax(logits, -1).numpy()
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "ref.txt").write_text(reference_text(), encoding="utf-8")
        cmd = [a.llama_python, "-c", LLAMA, str(tmp / res.info["artifact"])]
        out = subprocess.run(
            [*cmd, str(tmp / "ids.json"), str(tmp / "ref.txt")],
            capture_output=True,
            text=True,
            check=True,
        )
        theirs = json.loads(out.stdout)
    nll_q, top_q = per_token(ours, ids)
    nll_l, top_l = per_token(np.array(theirs["logp"]), ids)
    row = {
        "ftype": a.ftype.upper(),
        "weights": str(a.weights) if a.weights else "embedded",
        "tokens": len(ids),
        "tokenizer_ids_equal": theirs["tokens"] == ids,
        "artifact_check": res.info["artifact_check"],
        "ppl_qexp": float(np.exp(nll_q.mean())),
        "ppl_llama_cpp": float(np.exp(nll_l.mean())),
        "ppl_ratio_llama_cpp_over_qexp": float(np.exp(nll_l.mean() - nll_q.mean())),
        "mean_abs_nll_diff": float(np.abs(nll_l - nll_q).mean()),
        "top1_agreement": float((top_l == top_q).mean()),
    }
    print(json.dumps(row, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, row)


if __name__ == "__main__":
    main()
