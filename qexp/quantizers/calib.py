"""Calibration data for quantizers that need it (GPTQ, AWQ), without the hub by default.

The `quantizer.calibration` node (conf/quantizer/base/calibration.yaml):
`source=self`: N sequences sampled from the full-precision model being quantized (first
token uniform over the non-special vocabulary, then ancestral sampling at temperature 1, no
early end), seeded: data-free, as in LLM-QAT. `source=file`: a local .txt (one document) or
.jsonl (a `text` field per line) file at `path`, tokenized and cut into consecutive windows.
`source=dataset`: a hub dataset (`dataset`, e.g. `wikitext:wikitext-2-raw-v1` or
`allenai/c4:en`), its `text` column, documents shuffled with the seed; needs the network or
a local HF cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.hub import hub_dataset

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SOURCES = ("self", "file", "dataset")


KEY = "calibration"  # the node's key inside a quantizer's config


@dataclass
class Calibration:
    """Which calibration sequences a quantizer sees, and how many of what length."""

    source: str = "self"
    path: Optional[str] = None
    dataset: Optional[str] = None
    samples: int = 16
    seq_len: int = 128

    def __post_init__(self) -> None:
        check_choice(f"{KEY}.source", self.source, SOURCES)
        check(self.samples >= 1, f"{KEY}.samples", self.samples, "an integer >= 1")
        check(self.seq_len >= 8, f"{KEY}.seq_len", self.seq_len, "an integer >= 8")
        if self.source == "file":
            p = Path(self.path).expanduser() if self.path else None
            check(
                p is not None and p.is_file() and p.suffix in (".txt", ".jsonl"),
                f"{KEY}.path",
                self.path,
                "an existing .txt or .jsonl file (needed with source=file)",
            )
        if self.source == "dataset":
            check(
                bool(self.dataset),
                f"{KEY}.dataset",
                self.dataset,
                "a hub dataset id, optionally with a config after ':' (needed with source=dataset)",
            )

    def describe(self) -> dict:
        """What was used, for results.json."""
        out = {"source": self.source, "samples": self.samples, "seq_len": self.seq_len}
        if self.source == "file":
            out["path"] = str(self.path)
        if self.source == "dataset":
            out["dataset"] = self.dataset
        return out

    def sequences(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> list[list[int]]:
        """`samples` token-id lists of exactly `seq_len` tokens each."""
        if self.source == "self":
            return sample_from_model(model, tokenizer, self.samples, self.seq_len, seed)
        texts = self._file_texts() if self.source == "file" else self._dataset_texts(seed)
        return windows(tokenizer, texts, self.samples, self.seq_len, self.source)

    def _file_texts(self) -> list[str]:
        p = Path(self.path).expanduser()
        if p.suffix == ".txt":
            return [p.read_text(encoding="utf-8")]
        texts = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ConfigError(
                        f"quantizer.{KEY}.path", f"{p}:{n}", 'JSONL lines like {"text": "..."}'
                    )
                texts.append(row["text"])
        return texts

    def _dataset_texts(self, seed: int) -> list[str]:
        hub_id, _, name = str(self.dataset).partition(":")
        key = f"quantizer.{KEY}.dataset"
        ds = hub_dataset(key, hub_id, "train", name or None).shuffle(seed=seed)
        texts: list[str] = []
        for row in ds:
            if row.get("text", "").strip():
                texts.append(row["text"])
            if sum(len(t) for t in texts) > 8 * self.samples * self.seq_len:
                break
        return texts


def windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], n: int, seq_len: int, source: str
) -> list[list[int]]:
    """Consecutive `seq_len`-token windows over the concatenated documents."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(ids) >= n * seq_len:
            break
    if len(ids) < n * seq_len:
        raise ConfigError(
            f"quantizer.{KEY}.samples",
            n,
            f"at most {len(ids) // seq_len} sequences of {seq_len} tokens from source={source} "
            f"({len(ids)} tokens)",
        )
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]


@torch.no_grad()
def sample_from_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, seq_len: int, seed: int
) -> list[list[int]]:
    """Seeded ancestral samples from `model` (its own distribution, no early end)."""
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    first = vocab[torch.randint(len(vocab), (n, 1), generator=g)]
    device = next(model.parameters()).device
    ids = first.to(device)
    past = None
    step_in = ids
    for _ in range(seq_len - 1):
        out = model(input_ids=step_in, past_key_values=past, use_cache=True)
        past = out.past_key_values
        probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
        probs[:, sorted(special)] = 0.0
        nxt = torch.multinomial(probs, 1, generator=g).to(device)
        ids = torch.cat([ids, nxt], dim=1)
        step_in = nxt
    return ids.cpu().tolist()
