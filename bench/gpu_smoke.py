"""GPU smoke test (run through bench/gpu_smoke.sh): qexp's GPU path row by row, CPU alongside.

Rows: generation throughput on CUDA vs CPU (random weights in the embedded model's
SmolLM2-135M shape and in Llama-3.2-1B's), qexp's RTN on CUDA vs CPU (same codes?), encrypt
preset=exact on CUDA (bit-identical bf16 logits on the GPU's kernels?), the gap attack and
encrypt through the whole pipeline on the device, and the quantizer libraries' CUDA kernels
(bitsandbytes NF4, GPTQModel GPTQ/AWQ, llama.cpp). A row whose library is missing or that
needs CUDA on a machine without it is `skipped` with the reason; an error is `failed` with
its message. The JSON is rewritten after every row.

    python bench/gpu_smoke.py --out bench/results/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
SHAPES = {  # (hidden, layers, heads, kv heads, intermediate, vocab)
    "smollm2_135m": (576, 30, 9, 3, 1536, 49152),
    "llama3_1b": (2048, 16, 32, 8, 8192, 128256),
}


class Skip(Exception):
    """A row that cannot run here (the reason is its message)."""


def need_cuda() -> None:
    if not CUDA:
        raise Skip("no CUDA device on this machine")


def need(module: str, why: str = "") -> object:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{module} is not importable here ({e}){why}") from None


def random_model(shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    h, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@torch.no_grad()
def tokens_per_s(model: torch.nn.Module, batch: int = 4, new: int = 32) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=model.device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    sync()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    sync()
    return batch * new / (time.perf_counter() - t0)


def row_generate(shape: str) -> Callable[[], dict]:
    def run() -> dict:
        cpu = tokens_per_s(random_model(shape, "cpu", torch.float32))
        out = {"cpu_fp32_tok_s": round(cpu, 1), "cpu_threads": torch.get_num_threads()}
        if CUDA:
            gpu = tokens_per_s(random_model(shape, "cuda", torch.bfloat16))
            out.update({"cuda_bf16_tok_s": round(gpu, 1), "speedup": round(gpu / cpu, 1)})
        else:
            out["cuda"] = "skipped: no CUDA device on this machine"
        return out

    return run


def row_rtn() -> dict:
    from qexp.quantizers.rtn import rtn_fake_quant

    need_cuda()
    model = random_model("smollm2_135m", "cpu", torch.float32)
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    times, worst = {}, 0.0
    outs = {}
    for dev in ("cpu", "cuda"):
        sync()
        t0 = time.perf_counter()
        outs[dev] = [rtn_fake_quant(w.to(dev), 4, 128, True) for w in ws]
        sync()
        times[dev] = time.perf_counter() - t0
    for a, b in zip(outs["cpu"], outs["cuda"]):
        worst = max(worst, float((a - b.cpu()).abs().max()))
    return {
        "tensors": len(ws),
        "cpu_s": round(times["cpu"], 3),
        "cuda_s": round(times["cuda"], 3),
        "max_abs_diff_cpu_vs_cuda": worst,
    }


@torch.no_grad()
def row_encrypt_exact() -> dict:
    from qexp.attacks.encrypt import Encrypt
    from qexp.core.plugin import Subject

    need_cuda()
    model = random_model("smollm2_135m", "cuda", torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device="cuda")
    before = model(input_ids=ids).logits
    sync()
    t0 = time.perf_counter()
    Encrypt(preset="exact").apply(Subject(model, None, "attacked", ""), None)
    sync()
    dt = time.perf_counter() - t0
    after = model(input_ids=ids).logits
    return {
        "encrypt_s": round(dt, 2),
        "bf16_logits_bit_identical_on_cuda": bool(torch.equal(before, after)),
        "max_abs_logit_diff": float((before.float() - after.float()).abs().max()),
    }


def pipeline(*overrides: str, device: str) -> dict:
    """One `python -m qexp` job in this process on a tiny model; its results.json."""
    need("hydra", " (bench/gpu_smoke.sh --prepare carries it)")
    from hydra import compose, initialize_config_dir

    from qexp.pipeline.run import run

    tmp = Path(tempfile.mkdtemp(prefix="qexp-smoke-"))
    try:
        base = [
            "model=tiny_llama",
            "logger=none",
            "progress=false",
            "cache=off",
            f"device={device}",
            "similarity.enabled=false",
            f"cache_dir={tmp / 'cache'}",
            *overrides,
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=base)
        t0 = time.perf_counter()
        res = run(cfg, tmp / "run")
        body = json.loads((tmp / "run" / "results.json").read_text())
        return {
            "device": device,
            "run_status": body["status"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "stage_seconds": body["stage_seconds"],
            "conditions": {
                k: {m: v for m, v in c.items() if m in ("ref_ppl", "injection_rate")}
                for k, c in res.conditions.items()
            },
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


GAP = [
    "attack=gap",
    "benchmark=instruct",
    "benchmark.limit=4",
    "benchmark.max_new_tokens=8",
    "benchmark.semantic_refusal=false",  # its MiniLM encoder (qexp[eval]) is not carried
    "attack.inject_steps=8",
    "attack.repair_steps=8",
    "quantizer=rtn4",
]


def row_pipeline(overrides: list[str], cuda_only: bool = False) -> Callable[[], dict]:
    def run() -> dict:
        if cuda_only:
            need_cuda()
        return pipeline(*overrides, device="cuda" if CUDA else "cpu")

    return run


def row_llamacpp() -> dict:
    need_cuda()
    raise Skip(
        "qexp builds llama.cpp's libggml-base for the CPU only (`qexp-build-ggml`; llama.cpp "
        "quantizes on the CPU too); a CUDA build of llama.cpp was not attempted"
    )


ROWS: list[tuple[str, Callable[[], dict]]] = [
    ("generate_smollm2_135m_shape", row_generate("smollm2_135m")),
    ("generate_llama3_1b_shape", row_generate("llama3_1b")),
    ("rtn4_cuda_vs_cpu", row_rtn),
    ("encrypt_exact_cuda", row_encrypt_exact),
    (
        "pipeline_encrypt_exact",
        row_pipeline(["attack=encrypt", "attack.preset=exact", "benchmark=none"]),
    ),
    ("pipeline_gap_rtn4", row_pipeline(GAP)),
    ("bnb_nf4_cuda", row_pipeline(["quantizer=bnb_nf4", "benchmark=none"], cuda_only=True)),
    ("gptq4_cuda", row_pipeline(["quantizer=gptq4", "benchmark=none"], cuda_only=True)),
    ("awq4_cuda", row_pipeline(["quantizer=awq4", "benchmark=none"], cuda_only=True)),
    ("gguf_q4_k_m_llamacpp_cuda", row_llamacpp),
]
LIBRARY = {"bnb_nf4_cuda": "bitsandbytes", "gptq4_cuda": "gptqmodel", "awq4_cuda": "gptqmodel"}


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": CUDA,
        "device": torch.cuda.get_device_name(0) if CUDA else None,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "carried_site": os.environ.get("QEXP_SMOKE_SITE"),
    }
    for mod in ("hydra", "omegaconf", "gguf", "bitsandbytes", "gptqmodel", "matplotlib", "scipy"):
        try:
            m = importlib.import_module(mod)
            env[mod] = getattr(m, "__version__", "importable")
        except ImportError:
            env[mod] = None
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_smoke.json")
    p.add_argument("--rows", help="comma-separated row names (default: all)")
    a = p.parse_args()
    res = {"environment": environment(), "rows": {}}
    chosen = set(a.rows.split(",")) if a.rows else None
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in ROWS:
        if chosen is not None and name not in chosen:
            continue
        t0 = time.perf_counter()
        try:
            if name in LIBRARY and CUDA:
                need(LIBRARY[name])
            row = {"status": "ok", **fn()}
        except Skip as e:
            row = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a smoke test reports every failure and goes on
            row = {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}"[:500],
                "traceback": traceback.format_exc()[-1500:],
            }
        row["seconds"] = round(time.perf_counter() - t0, 1)
        res["rows"][name] = row
        print(f"{name}: {json.dumps(row)[:300]}", flush=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(a.out)
    print(f"written {a.out}")
    sys.exit(1 if any(r["status"] == "failed" for r in res["rows"].values()) else 0)


if __name__ == "__main__":
    main()
