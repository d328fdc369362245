"""Batched greedy/sampled generation with left padding and stop strings."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


class NLLRecorder(LogitsProcessor):
    """Records -log p of each generated token under the model's (pre-warper) distribution.

    Placed before temperature/top-p warpers by transformers, so the probabilities are the
    model's own; only one step's log-softmax is held at a time.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _take(self, chosen: torch.Tensor) -> None:
        self.steps.append(-self.prev.gather(1, chosen[:, None])[:, 0].cpu())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last: torch.Tensor) -> torch.Tensor:
        """[batch, steps] NLLs once generation has produced its last token `last`."""
        self._take(last)
        self.prev = None
        return torch.stack(self.steps, dim=1)


@dataclass
class Generation:
    """One prompt's output, cut before the first stop string."""

    prompt: str
    text: str
    token_ids: list[int]
    nll: float  # sum of -log p(token) over token_ids, from the logits seen while generating


@dataclass
class GenerationSettings:
    """Decoding settings shared by generative benchmarks."""

    max_new_tokens: int
    batch_size: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    prefix_cache: bool = True


def _cut(tok: PreTrainedTokenizerBase, ids: list[int], stops: Sequence[str]) -> list[int]:
    """Longest prefix of `ids` whose text holds no stop string (binary search)."""

    def has_stop(k: int) -> bool:
        text = tok.decode(ids[:k], skip_special_tokens=True)
        return any(s in text for s in stops)

    if not stops or not has_stop(len(ids)):
        return ids
    lo, hi = 0, len(ids)  # has_stop(lo) is False, has_stop(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has_stop(mid) else (mid, hi)
    return ids[:lo]


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences, leaving each >= 1 token."""
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(x[i] != first[i] for x in seqs):
            return i
    return max(n, 0)


def _pad_left(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    desc: str = "generate",
) -> tuple[list[Generation], float]:
    """Generate for every prompt in batches; returns outputs and new tokens per second.

    With `settings.prefix_cache`, the token prefix that all prompts share (e.g. few-shot
    examples) is run through the model once; each batch continues from a copy of its KV
    cache, with the prompts' own tokens left-padded after it. Tokenization is the full
    prompts' own either way; the prefix's time counts in tokens per second.
    """
    special = {tok.pad_token_id, tok.eos_token_id}
    encoded = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    outs: list[Generation] = []
    n_new, seconds = 0, 0.0
    prefix: list[int] = []
    cache = None
    if settings.prefix_cache and len(prompts) > 1:
        prefix = encoded[0][: common_prefix_len(encoded)]
    if prefix:
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        model(
            input_ids=torch.tensor([prefix], device=model.device),
            past_key_values=cache,
            use_cache=True,
        )
        seconds += time.perf_counter() - t0
    bs = settings.batch_size
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for b in range(0, len(prompts), bs):
        batch = list(prompts[b : b + bs])
        ids, mask = _pad_left([e[len(prefix) :] for e in encoded[b : b + bs]], tok.pad_token_id)
        rec = NLLRecorder()
        kwargs = dict(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([rec]),
        )
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
            ids = torch.cat([torch.tensor([prefix] * len(batch)), ids], dim=1)
            mask = torch.cat([torch.ones(len(batch), len(prefix), dtype=mask.dtype), mask], 1)
            kwargs["past_key_values"] = past
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            torch.manual_seed(settings.seed + b)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_strings:
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tok)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs
        )
        seconds += time.perf_counter() - t0
        width = ids.shape[1]
        nll = rec.finish(out[:, -1])
        for row, prompt, row_nll in zip(out.tolist(), batch, nll):
            new = row[width:]
            end = next((i for i, t in enumerate(new) if t in special), len(new))
            n_new += end
            kept = _cut(tok, new[:end], stop_strings)
            text = tok.decode(kept, skip_special_tokens=True).strip()
            outs.append(Generation(prompt, text, kept, float(row_nll[: len(kept)].sum())))
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_new / max(seconds, 1e-9):.1f}")
    bar.close()
    return outs, n_new / max(seconds, 1e-9)
