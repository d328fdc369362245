"""Metric functions on generated text and on model likelihoods.

Repetition metrics work on a token sequence (the benchmarks pass the model's generated token
ids, as the reparameterization paper does; tests pass word lists):
- `max_repeat_3`: the longest run of consecutive identical 3-grams, where the 3-grams tile
  the sequence without overlap; the maximum over the three tiling offsets. A sequence that
  loops on one 3-token phrase k times scores k; one with no repeated adjacent 3-gram scores 1.
  (The paper's MaxRepeat-N with N = 3.)
- `seq_rep_4`: 1 - unique 4-grams / 4-grams (stride 1), Welleck et al.'s seq-rep-4.
Both are undefined (None) on sequences too short to hold one n-gram; means skip them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def max_repeat_n(tokens: Sequence[Hashable], n: int = 3) -> int | None:
    """Longest run of identical consecutive non-overlapping n-grams (best tiling offset)."""
    w = list(tokens)
    if len(w) < n:
        return None
    best = 1
    for off in range(n):
        grams = [tuple(w[i : i + n]) for i in range(off, len(w) - n + 1, n)]
        run = 1
        for prev, cur in zip(grams, grams[1:]):
            run = run + 1 if cur == prev else 1
            best = max(best, run)
    return best


def seq_rep_n(tokens: Sequence[Hashable], n: int = 4) -> float | None:
    """1 - |unique n-grams| / |n-grams| over stride-1 n-grams."""
    w = list(tokens)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def last_number(text: str) -> float | None:
    """The last number in a text (commas as thousands separators), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def perplexity(nll_sum: float, n_tokens: int) -> float | None:
    """exp(mean NLL); None for zero tokens."""
    if n_tokens == 0:
        return None
    return math.exp(nll_sum / n_tokens)


@torch.no_grad()
def token_nll(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    text: str,
    window: int = 1024,
    stride: int = 512,
) -> torch.Tensor:
    """-log p of every token of `text` (after a BOS/EOS start token), float32 [n_tokens].

    Texts longer than `window` are scored with sliding windows: each window scores only the
    tokens the previous ones did not, conditioned on up to `window - stride` tokens before.
    """
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got stride={stride}, window={window}")
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [start] + tok(text, add_special_tokens=False).input_ids
    out = torch.empty(len(ids) - 1)
    done = 0  # tokens scored so far (targets ids[1:done + 1])
    while done < len(ids) - 1:
        end = min(len(ids), window if done == 0 else done + 1 + stride)
        begin = max(0, end - window)
        chunk = torch.tensor([ids[begin:end]], device=model.device)
        logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].float(), dim=-1)
        nll = -logp.gather(1, chunk[0, 1:, None])[:, 0].cpu()
        new = end - 1 - done
        out[done : done + new] = nll[-new:]
        done += new
    return out
