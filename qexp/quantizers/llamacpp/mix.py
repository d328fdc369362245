"""llama.cpp's per-tensor type choice for a GGUF file type (`Q4_K_M`, `IQ4_XS`, ...).

A re-statement of `llama_tensor_get_type` (src/llama-quant.cpp, llama.cpp 0c1e570) for
dense decoder models: the `_S`/`_M`/`_L` mixes give some attn_v/ffn_down/attn_output
tensors more bits, tied embeddings become Q6_K/Q8_0, and a tensor whose row length is not a
multiple of its type's block falls back to a 32-block type (Q4_K -> Q5_0, Q6_K -> Q8_0, ...).
It was checked against libllama's own choice on 1008 (geometry, file type) cases, and
tests/test_llamacpp.py pins the embedded model's mix. See docs/quantizers.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
from torch import nn

# file type -> the default tensor type (llama_model_quantize_impl)
FTYPES = {
    "q2_k": "Q2_K",
    "q3_k_s": "Q3_K",
    "q3_k_m": "Q3_K",
    "q3_k_l": "Q3_K",
    "q4_k_s": "Q4_K",
    "q4_k_m": "Q4_K",
    "q5_k_s": "Q5_K",
    "q5_k_m": "Q5_K",
    "q6_k": "Q6_K",
    "iq4_xs": "IQ4_XS",
    "iq4_nl": "IQ4_NL",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "q8_0": "Q8_0",
}
BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}
# HF model_type -> llama.cpp architecture (convert_hf_to_gguf's choice); dense decoders whose
# tensors follow the rules above
ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}
CATEGORIES = (
    ("attn_qkv.weight", "attn_v"),
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)


def block(t: str) -> int:
    return BLOCK.get(t, 1 if t in ("F16", "BF16", "F32") else 32)


@dataclass(frozen=True)
class Tensor:
    """A weight as llama.cpp sees it: GGUF name, row length (ne0) and rank."""

    name: str
    ne0: int
    ndim: int


def gguf_names(model: nn.Module, config: Any) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name, for the model's architecture."""
    arch = ARCHS[config.model_type]
    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out = {}
    for name, _ in model.named_parameters():
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ValueError(f"{name}: no GGUF name for architecture {arch.name.lower()}")
        out[name] = g
    return out


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    if name in ("output.weight", "token_embd.weight"):
        return name.split(".")[0]
    return next((cat for key, cat in CATEGORIES if key in name), "other")


def quantizable(t: Tensor) -> bool:
    """Whether llama-quantize quantizes this tensor (2-D weights but norms)."""
    return t.ndim >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name


def fallback(t: str, ne0: int) -> str:
    """The type llama.cpp uses when `ne0` is not a multiple of `t`'s block."""
    if ne0 % block(t) == 0:
        return t
    alt = FALLBACK.get(t, t)
    return alt if ne0 % block(alt) == 0 else "F16"


def _attn_v(ftype: str, t: str, i: int, n: int, gqa: int) -> str:
    if ftype == "q2_k":
        return "Q4_K" if gqa >= 4 else "Q3_K"
    if ftype == "q3_k_m":
        return "Q5_K" if i < 2 else "Q4_K"
    if ftype == "q3_k_l" or (ftype in ("iq4_nl", "iq4_xs") and gqa >= 4):
        return "Q5_K"
    if ftype in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
        return "Q6_K"
    if ftype == "q4_k_s" and i < 4:
        return "Q5_K"
    return t


def _ffn_down(ftype: str, t: str, i: int, n: int, imatrix: bool) -> str:
    if ftype == "q2_k":
        return "Q3_K"
    if ftype == "q3_k_m":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if ftype == "q3_k_l":
        return "Q5_K"
    if ftype in ("q4_k_m", "q5_k_m"):
        return "Q6_K" if _more_bits(i, n) else t
    if ftype in ("iq4_nl", "iq4_xs") and not imatrix and i < n // 8:
        return "Q5_K"
    if ftype == "q4_k_s" and i < n // 8:
        return "Q5_K"
    if ftype in ("q4_0", "q5_0") and imatrix and i < n // 8:
        return "Q4_1" if ftype == "q4_0" else "Q5_1"
    return t


def type_mix(
    tensors: list[Tensor],
    ftype: str,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    imatrix: bool = False,
    pure: bool = False,
) -> dict[str, str]:
    """GGUF name -> GGML type name for every tensor llama-quantize quantizes."""
    # llama_model_loader's order: non-block tensors, then by block index and name
    order = sorted(
        tensors,
        key=lambda t: (int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1, t.name),
    )
    default = FTYPES[ftype]
    gqa = n_head // n_head_kv
    is_70b = n_layer == 80 and n_head != n_head_kv
    tied = not any(t.name == "output.weight" for t in order)
    n_wv = sum(_category(t.name) == "attn_v" for t in order)
    i_wv = i_down = 0
    out = {}
    for t in filter(quantizable, order):
        cat, typ = _category(t.name), default
        if pure:
            pass
        elif cat == "output" or (tied and cat == "token_embd"):
            typ = "Q8_0" if t.ne0 % block(default) else ("Q8_0" if default == "Q8_0" else "Q6_K")
        elif cat == "attn_v":
            typ = _attn_v(ftype, typ, i_wv, n_wv, gqa)
            if is_70b and typ in ("Q3_K", "Q4_K"):
                typ = "Q5_K"
            i_wv += 1
        elif cat == "ffn_down":
            typ = _ffn_down(ftype, typ, i_down, n_layer, imatrix)
            i_down += 1
        elif cat == "attn_output":
            typ = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(ftype, typ)
        out[t.name] = fallback(typ, t.ne0)
    return out
