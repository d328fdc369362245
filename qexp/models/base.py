"""Model sources: each config in conf/model/ builds one of these."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from qexp.core.context import RunContext
from qexp.core.plugin import Plugin

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer (left padding, pad token set)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


class ModelSource(Plugin, ABC):
    """Loads a fresh copy of one causal LM; called once per pipeline branch.

    `fingerprint()` identifies the weights beyond the config (files' digests).
    """

    group: ClassVar[str] = "model"

    @abstractmethod
    def load(self, ctx: RunContext) -> LoadedModel:
        """Return a new model instance on ctx.device in ctx.dtype."""

    @abstractmethod
    def hf_config(self, ctx: RunContext) -> PretrainedConfig:
        """The model's config (config.json) without its weights: what every plugin's
        `check_model` reads before the first forward pass. Errors are ConfigErrors."""


def finish_loading(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, source: str, ctx: RunContext
) -> LoadedModel:
    """Move to device/dtype (unless `from_pretrained` placed it with a device_map), eval mode,
    left padding and a pad token for batched generation."""
    tok.padding_side = "left"
    # BPE tokenizers: transformers' space clean-up would alter decoded outputs (and warns).
    tok.clean_up_tokenization_spaces = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(device=ctx.device, dtype=ctx.dtype)
    model = model.eval()
    return LoadedModel(model=model, tokenizer=tok, source=source)
