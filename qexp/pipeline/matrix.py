"""experiment=matrix: attacks × defenses × prune × quantizers as one multirun, and its plan.

The plan counts the cells and the stages the stage cache runs once for all of them (one
`original` evaluation per model; one attack per attack and what its cache key depends on;
one defended, pruned and quantized original per defense × prune × quantizer; the attacked
branch per cell),
and estimates the wall time from `matrix.cost` (seconds per stage on the embedded model,
one job at a time on 2 CPU cores, measured: docs/matrix.md), scaled by the model's
parameter count. The estimate assumes a cold cache; hits make a sweep faster.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qexp.core.errors import check, check_choice
from qexp.core.registry import option_class, option_node

EMBEDDED_PARAMS = 134_515_008  # SmolLM2-135M, what matrix.cost was measured on
AXES = ("model", "attack", "defense", "prune", "quantizer")


def check_matrix(node: Any) -> None:
    """`matrix.size` names one of `matrix.sizes`, each with its five lists."""
    m = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    sizes = m.get("sizes") or {}
    check_choice("matrix.size", m.get("size"), tuple(sizes))
    for name, s in sizes.items():
        for k in AXES:
            check(bool(s.get(k)), f"matrix.sizes.{name}.{k}", s.get(k), "a comma-separated list")


def _values(v: Any) -> list[str]:
    return [x.strip() for x in str(v).split(",") if x.strip()]


def axes(cfg: DictConfig) -> dict[str, list[str]]:
    """model, attack, defense, prune and quantizer values of the sweep (command-line
    overrides of one of them fix it)."""
    params = cfg.hydra.sweeper.params
    overrides = {o.partition("=")[0]: o.partition("=")[2] for o in cfg.hydra.overrides.task}
    return {k: _values(overrides.get(k, params[k])) for k in AXES}


def _param_count(model: str) -> int:
    """Parameters of a model option, from its config (no weights loaded)."""
    node = option_node("model", model)
    if model == "smollm2_135m":
        return EMBEDDED_PARAMS
    h, layers = node.get("hidden_size"), node.get("num_layers")
    if h and layers:  # a tiny random model, from its config
        inter, vocab = node.get("intermediate_size", 4 * h), node.get("vocab_size", 32000)
        return int(layers * (4 * h * h + 3 * h * inter) + 2 * vocab * h)
    return 8_000_000_000  # a hub model: counted as 8B-class


def by_quantizer(value: Any, quantizer: str | None) -> float:
    """A cost: seconds, or {quantizer-name prefix: seconds, ..., default: seconds} (the
    longest prefix of `quantizer` that is a key; `default` otherwise)."""
    if not isinstance(value, dict):
        return float(value)
    keys = [k for k in value if k != "default" and quantizer and quantizer.startswith(k)]
    return float(value[max(keys, key=len)] if keys else value["default"])


def plan(cfg: DictConfig) -> dict:
    """Cells, shared stages and the estimated seconds of a matrix sweep."""
    ax = axes(cfg)
    cost = OmegaConf.to_container(cfg.matrix.cost, resolve=True)
    limit = int(cfg.benchmark.limit or 60)
    tokens = int(cfg.benchmark.get("max_new_tokens") or 64)
    conditions = list(cfg.conditions)
    cells = list(itertools.product(*(ax[k] for k in AXES)))
    per = cost.get("attack_per", {})
    attack_stages = {
        (m, a, *((k, c) for k, c in zip(AXES[2:], rest) if k in per.get(a, [])))
        for m, a, *rest in cells
    }
    original_q = {(m, d, p, q) for m, _, d, p, q in cells}
    seconds = 0.0
    scale = {m: _param_count(m) / EMBEDDED_PARAMS for m in ax["model"]}

    def quantize_s(q: str) -> float:
        data = option_class("quantizer", q, "matrix.quantizer").data_dependent
        return cost["quantize_data_dependent"] if data else cost["quantize"]

    evaluate = cost["evaluate_per_item_token"] * limit * tokens

    def evaluate_q(q: str) -> float:
        return by_quantizer(cost["evaluate_quantized_per_item_token"], q) * limit * tokens

    def branch_q(d: str, p: str, q: str) -> float:  # defend, prune, quantize, evaluate a branch
        defend = by_quantizer(cost["defense"].get(d, 0), q)
        return defend + float(cost["prune"].get(p, 0)) + quantize_s(q) + evaluate_q(q)

    for m, a, *extra in attack_stages:
        key = dict(extra)
        q = key.get("quantizer", ax["quantizer"][0] if len(ax["quantizer"]) == 1 else None)
        attack_s = by_quantizer(cost["attack"].get(a, 0), q)
        seconds += scale[m] * (attack_s + evaluate * ("attacked" in conditions))
    for m, d, p, q in original_q:
        seconds += scale[m] * branch_q(d, p, q) * ("original_q" in conditions)
    for m, _, d, p, q in cells:
        seconds += scale[m] * branch_q(d, p, q) * ("attacked_q" in conditions)
    seconds += sum(scale[m] * evaluate for m in ax["model"]) * ("original" in conditions)
    seconds += cost["job"] * len(cells)  # start-up, loading, similarity, bookkeeping
    return {
        "size": str(cfg.matrix.size),
        "axes": ax,
        "cells": len(cells),
        "stages": {
            "attack": len(attack_stages),
            "original_q": len(original_q),
            "attacked_q": len(cells),
            "original": len(ax["model"]),
        },
        "items_per_condition": limit,
        "new_tokens_per_item": tokens,
        "estimated_seconds": round(seconds, 1),
        "estimated_cpu_hours": round(2 * seconds / 3600, 2),
        "estimate_basis": "2 CPU cores, one job at a time, cold stage cache (docs/matrix.md)",
        "gpu_hours": None,
    }


def describe(p: dict) -> str:
    """One paragraph for the console."""
    ax = p["axes"]
    shown = [k for k in AXES[1:] if k != "prune" or ax["prune"] != ["none"]]
    label = {"prune": "prune settings"}
    dims = " × ".join(f"{len(ax[k])} {label.get(k, k + 's')}" for k in shown)
    h = p["estimated_seconds"] / 3600
    when = f"{h:.1f} h" if h >= 1 else f"{math.ceil(p['estimated_seconds'] / 60)} min"
    st = p["stages"]
    return (
        f"qexp matrix ({p['size']}): {p['cells']} cells ({dims}) on {', '.join(ax['model'])}; "
        f"the cache runs {st['attack']} attack(s), {st['original_q']} defended originals and "
        f"{st['attacked_q']} attacked cells, {p['items_per_condition']} items per condition; "
        f"estimated {when} wall ({p['estimated_cpu_hours']} CPU-hours, {p['estimate_basis']}); "
        "GPU hours: not calibrated (no CUDA machine was measured)"
    )
