"""Architecture geometry: which tensors an attack or defense touches, by name, and the heads.

Works from a Hugging Face config (dict or object) and parameter names alone, so the same
adapter serves an in-memory model and a checkpoint streamed from safetensors shards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qexp.core.errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
QK_NORM_ARCHS = ("qwen3",)
_NAME = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\."
    r"(weight|bias)$"
)
_NORM = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$"
)
NORM_ROLES = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_norm"}


@dataclass(frozen=True)
class Geometry:
    """Head layout of a decoder: query heads share kv-head h // (num_heads // num_kv_heads)."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    qk_norm: bool

    @property
    def group(self) -> int:
        """Query heads per kv-head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads


def config_getter(config: Any) -> Callable[..., Any]:
    """`get(key, default=None)` for a config.json dict or a transformers config object."""
    if isinstance(config, dict):
        return config.get
    return lambda key, default=None: getattr(config, key, default)


# config.json keys that are sizes: a positive integer wherever they appear
SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
)


def bad_size(config: Any) -> tuple[str, Any] | None:
    """The first size key of a config whose value is not a positive integer (absent keys are
    fine), as (key, value); None when every present one is."""
    get = config_getter(config)
    for key in SIZE_KEYS:
        v = get(key)
        if v is not None and (type(v) is not int or v < 1):
            return key, v
    return None


def geometry(config: Any) -> Geometry:
    """Geometry of a supported architecture; ConfigError listing the supported ones, or
    naming a size key that is missing, not a positive integer, or does not divide."""
    get = config_getter(config)
    model_type = get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            "model (architecture)",
            model_type,
            "one of " + ", ".join(SUPPORTED) + " for this attack/defense",
        )
    bad = bad_size(config)
    if bad is not None:
        raise ConfigError(f"config.json {bad[0]}", bad[1], "a positive integer")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"):
        if get(key) is None:
            raise ConfigError(f"config.json {key}", None, "a positive integer (it is required)")
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    kv = get("num_key_value_heads") or heads
    if heads % kv:
        raise ConfigError("config.json num_key_value_heads", kv, f"a divisor of {heads} heads")
    if get("head_dim") is None and hidden % heads:
        raise ConfigError("config.json num_attention_heads", heads, f"a divisor of {hidden}")
    return Geometry(
        model_type=model_type,
        num_layers=get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=get("head_dim") or hidden // heads,
        hidden_size=hidden,
        intermediate_size=get("intermediate_size"),
        qk_norm=model_type in QK_NORM_ARCHS,
    )


def parse_name(name: str) -> tuple[int, str] | None:
    """(layer, role) for a tensor an attack may touch, e.g. (3, 'v_weight'); else None."""
    m = _NAME.match(name)
    if m is None:
        return None
    proj = m.group(3) or m.group(4)
    return int(m.group(1)), f"{proj}_{m.group(5)}"


def parse_norm_name(name: str) -> tuple[int, str] | None:
    """(layer, 'input_norm' | 'post_norm') for a decoder layer's RMSNorm weight; else None."""
    m = _NORM.match(name)
    return None if m is None else (int(m.group(1)), NORM_ROLES[m.group(2)])


def linear_shapes(config: Any) -> dict[str, tuple[int, int]] | None:
    """(out, in) of each decoder linear by projection name, from a config's standard keys
    (None when a key is missing: the check it serves is then left to quantization time)."""
    get = config_getter(config)
    hidden, inter, heads = get("hidden_size"), get("intermediate_size"), get("num_attention_heads")
    if not (hidden and inter and heads):
        return None
    kv = get("num_key_value_heads") or heads
    hd = get("head_dim") or hidden // heads
    return {
        "q_proj": (heads * hd, hidden),
        "k_proj": (kv * hd, hidden),
        "v_proj": (kv * hd, hidden),
        "o_proj": (hidden, heads * hd),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


_OTHER = re.compile(
    r"^(?:model\.)?(?:(embed_tokens|norm)|layers\.(\d+)\.self_attn\.(q_norm|k_norm))\.weight$"
)


def expected_shape(name: str, config: Any) -> list[int] | None:
    """The shape config.json implies for a decoder tensor of the standard layout (linear
    weights and biases, norms, embeddings, the head), or None for any other name or when a
    standard key is missing. A layer index the config does not have gives [] (no shape)."""
    get = config_getter(config)
    shapes, hidden, vocab = linear_shapes(config), get("hidden_size"), get("vocab_size")
    layers = get("num_hidden_layers")
    if shapes is None or not (vocab and layers):
        return None
    if name == "lm_head.weight":
        return [vocab, hidden]
    parsed = parse_name(name) or parse_norm_name(name)
    if parsed is not None:
        layer, role = parsed
        if not 0 <= layer < layers:
            return []
        if role.endswith("_norm"):
            return [hidden]
        out, inp = shapes[role.rpartition("_")[0] + "_proj"]
        return [out, inp] if role.endswith("_weight") else [out]
    m = _OTHER.match(name)
    if m is None:
        return None
    if m.group(1) == "embed_tokens":
        return [vocab, hidden]
    if m.group(1) == "norm":
        return [hidden]
    if not 0 <= int(m.group(2)) < layers:
        return []
    return [get("head_dim") or hidden // get("num_attention_heads")]


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position encoding was built for, if it says."""
    get = config_getter(config)
    return get("max_position_embeddings")


def param_count(config: Any) -> int | None:
    """Parameters of a supported decoder from its config.json keys alone (embeddings, an
    untied lm_head, every layer's linears, biases and norms, the final norm); None when a
    standard key is missing."""
    get = config_getter(config)
    shapes, hidden, vocab = linear_shapes(config), get("hidden_size"), get("vocab_size")
    layers = get("num_hidden_layers")
    if shapes is None or not (vocab and layers):
        return None
    per_layer = sum(o * i for o, i in shapes.values()) + 2 * hidden
    biased = {"q_proj", "k_proj", "v_proj"} if get("model_type") == "qwen2" else set()
    if get("attention_bias"):
        biased |= {"q_proj", "k_proj", "v_proj", "o_proj"}
    if get("mlp_bias"):
        biased |= {"gate_proj", "up_proj", "down_proj"}
    per_layer += sum(shapes[p][0] for p in biased)
    if get("model_type") in QK_NORM_ARCHS:
        per_layer += 2 * (get("head_dim") or hidden // get("num_attention_heads"))
    tied = get("tie_word_embeddings", True)
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden
