"""Function preservation as a number: original vs. attacked logits on a fixed probe batch."""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qexp.data import reference_text


class PreservationError(RuntimeError):
    """An attack meant to preserve function drifted beyond its tolerance."""


def probe_ids(tok: PreTrainedTokenizerBase, n: int = 8, length: int = 64) -> torch.Tensor:
    """n equal-length token windows of the reference passage (no padding needed)."""
    ids = tok(reference_text(), add_special_tokens=False).input_ids
    step = max(1, (len(ids) - length) // max(n - 1, 1))
    rows = [ids[i * step : i * step + length] for i in range(n)]
    return torch.tensor([r for r in rows if len(r) == length])


@torch.no_grad()
def probe_logits(model: PreTrainedModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits in float32 and bfloat16 (a temporary copy of the model for the other dtype)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)
        out[name] = m(input_ids=ids.to(model.device)).logits.float().cpu()
        del m
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
