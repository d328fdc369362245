"""Function preservation as a number: original vs. attacked logits on a fixed probe batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from qexp.core.plugin import StageResult, Subject
from qexp.data import reference_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class PreservationError(RuntimeError):
    """An attack meant to preserve function drifted beyond its tolerance."""


def probe_ids(tok: PreTrainedTokenizerBase, n: int = 8, length: int = 64) -> torch.Tensor:
    """n equal-length token windows of the reference passage (no padding needed)."""
    ids = tok(reference_text(), add_special_tokens=False).input_ids
    step = max(1, (len(ids) - length) // max(n - 1, 1))
    rows = [ids[i * step : i * step + length] for i in range(n)]
    return torch.tensor([r for r in rows if len(r) == length])


@contextmanager
def computed_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Forward passes as if the model were cast to `dtype` (`model.to(dtype)`), holding one
    module's parameters and floating buffers in `dtype` at a time instead of a second model:
    each module with tensors of its own swaps in cast copies just before its forward and the
    originals back just after."""
    handles = []

    def pre(m: torch.nn.Module, _: object) -> None:
        for store in (m._parameters, m._buffers):
            for n, t in list(store.items()):
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    m._qexp_stash.append((store, n, t))
                    store[n] = t.detach().to(dtype)

    def post(m: torch.nn.Module, _: object, __: object) -> None:
        for store, n, t in m._qexp_stash:
            store[n] = t
        m._qexp_stash.clear()

    for mod in model.modules():
        own = [*mod._parameters.values(), *mod._buffers.values()]
        if any(t is not None and t.is_floating_point() for t in own):
            mod._qexp_stash = []
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mod in model.modules():
            if hasattr(mod, "_qexp_stash"):
                post(mod, None, None)  # a forward that raised leaves nothing swapped
                del mod._qexp_stash


@torch.no_grad()
def probe_logits(model: PreTrainedModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits in float32 and bfloat16 (the other dtype module by module: `computed_in`)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with computed_in(model, dtype):
            out[name] = model(input_ids=ids.to(model.device)).logits.float().cpu()
    return out


def compare(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """The preservation report (keys as in results.json `function_preservation`)."""

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
        lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    b32, b16, a32, a16 = before["fp32"], before["bf16"], after["fp32"], after["bf16"]
    return {
        "max_abs_logit_diff_fp32": float((a32 - b32).abs().max()),
        "max_abs_logit_diff_bf16": float((a16 - b16).abs().max()),
        "kl_bf16": kl(b16, a16),
        "top1_agreement_bf16": float((a16.argmax(-1) == b16.argmax(-1)).float().mean()),
        "top1_agreement_fp32": float((a32.argmax(-1) == b32.argmax(-1)).float().mean()),
        # the attacked bf16 model against the fp32 reference, next to the original's own
        "attacked_bf16_vs_original_fp32_top1_agreement": float(
            (a16.argmax(-1) == b32.argmax(-1)).float().mean()
        ),
        "original_bf16_vs_fp32_max_abs_logit_diff": float((b16 - b32).abs().max()),
        "original_bf16_vs_fp32_kl": kl(b32, b16),
        "original_bf16_vs_fp32_top1_agreement": float(
            (b16.argmax(-1) == b32.argmax(-1)).float().mean()
        ),
        "probe_tokens": int(b32.shape[0] * b32.shape[1]),
    }


def measured(
    plugin: Any, subject: Subject, apply: Callable[[Subject], StageResult]
) -> tuple[StageResult, dict]:
    """`apply(subject)`, and for a plugin that declares a preservation tolerance the drift of
    its output against its input on the probe batch ({} otherwise)."""
    tolerance = plugin.preservation_tolerance()
    if tolerance is None:
        return apply(subject), {}
    ids = probe_ids(subject.tokenizer)
    before = probe_logits(subject.model, ids)
    out = apply(subject)
    report = {**compare(before, probe_logits(out.model, ids)), "tolerance": tolerance}
    if plugin.preservation_tolerance_bf16() is not None:
        report["tolerance_bf16"] = plugin.preservation_tolerance_bf16()
    return out, report


def check_drift(group: str, plugin: Any, report: dict | None) -> None:
    """Stop when a function-preserving stage drifted beyond its tolerance."""
    if not report:
        return
    drift = report["max_abs_logit_diff_fp32"]
    if not drift <= report["tolerance"]:
        raise PreservationError(
            f"{group}={plugin.name} changed the function: max |Δlogit| fp32 = {drift:.3g} > "
            f"{group}.tolerance = {report['tolerance']:g} (report in results.json)"
        )
    drift16 = report["max_abs_logit_diff_bf16"]
    if "tolerance_bf16" in report and not drift16 <= report["tolerance_bf16"]:
        raise PreservationError(
            f"{group}={plugin.name} is not exact in bf16: max |Δlogit| bf16 = {drift16:.3g} > "
            f"{report['tolerance_bf16']:g} (report in results.json)"
        )
