"""Tiny random causal LMs built from a config (no hub), for tests and quick checks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.data import reference_text, svamp_embedded_path
from qexp.models.base import LoadedModel, ModelSource, finish_loading

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

ARCHS = ("llama", "qwen2", "mistral", "qwen3")
SPECIAL = ["<|endoftext|>", "<|pad|>"]


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the project's own texts (deterministic, no download)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [reference_text()] + svamp_embedded_path().read_text().splitlines()
    tok.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[1]
    )


@dataclass
class TinyModel(ModelSource):
    """A randomly initialised model of a supported architecture, seeded."""

    name: str = "tiny_llama"
    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    vocab_size: int = 512
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ARCHS)
        for key in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
        ):
            check(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"a divisor of num_heads={self.num_heads}",
        )
        check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even integer (RoPE)")
        check(self.vocab_size >= 300, "vocab_size", self.vocab_size, "an integer >= 300")

    def hf_config(self, ctx: RunContext) -> PretrainedConfig:
        tok = tiny_tokenizer(self.vocab_size)
        return transformers.AutoConfig.for_model(
            self.arch,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=len(tok),
            max_position_embeddings=2048,
            initializer_range=self.init_std,
            tie_word_embeddings=self.arch in ("qwen2", "qwen3"),
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    def load(self, ctx: RunContext) -> LoadedModel:
        config = self.hf_config(ctx)
        torch.manual_seed(self.seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return finish_loading(model, tiny_tokenizer(self.vocab_size), f"tiny:{self.arch}", ctx)
