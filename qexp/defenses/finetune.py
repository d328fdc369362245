"""defense=finetune: a short clean fine-tune before quantization (the red-team note's
countermeasure): AdamW on clean instruction responses, same loop as attack=gap's repair
but unconstrained, over the linear weights of the last `last_layers` decoder layers (or
`layers`). The shipped clean responses (qexp/data/instruct.jsonl, train split) or
`data_path` (same JSONL fields) are the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch

from qexp.core.cache import file_sha256
from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.core.training import MODULES, chosen_layers, train_lm, trainable_weights
from qexp.data.instruct import check_data_path, encode, load_rows
from qexp.defenses.base import Defense
from qexp.quantizers.base import Quantizer


@dataclass
class Finetune(Defense):
    """Fine-tune on clean data; records the loss and how far the weights moved."""

    name: str = "finetune"
    steps: int = 60
    lr: float = 5e-5
    batch_size: int = 8
    layers: List[int] = field(default_factory=list)
    last_layers: int = 4
    modules: List[str] = field(default_factory=lambda: list(MODULES))
    data_path: Optional[str] = None

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.last_layers >= 1, "last_layers", self.last_layers, "an integer >= 1")
        for m in self.modules:
            check_choice("modules", m, MODULES)
        check_data_path(self.data_path)

    def check_spec(self, spec: Any) -> None:
        """The training rows load (qexp, Alpaca or Dolly layout) before any model does."""
        load_rows(self.data_path, "train", "defense.data_path")

    def check_model(self, config: Any) -> None:
        chosen_layers(config.num_hidden_layers, self.layers, self.last_layers, "defense")

    def fingerprint(self) -> Optional[str]:
        """The training data's digest (a user's file may change under the same path)."""
        return file_sha256(Path(self.data_path).expanduser()) if self.data_path else None

    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        model = subject.model
        for p in model.parameters():
            p.requires_grad_(False)
        params = trainable_weights(model, self.layers, self.last_layers, self.modules, "defense")
        before = {n: p.detach().clone() for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        data = encode(
            subject.tokenizer, load_rows(self.data_path, "train", "defense.data_path"), "clean", ""
        )
        g = ctx.seed_everything(2)
        losses = train_lm(
            model,
            list(params.values()),
            data,
            self.steps,
            self.lr,
            self.batch_size,
            g,
            "finetune",
            ctx.progress,
        )
        for p in params.values():
            p.requires_grad_(False)
        with torch.no_grad():
            rel = [float((p - before[n]).norm() / before[n].norm()) for n, p in params.items()]
        stats = {
            "trainable": len(params),
            "loss_first_last": [losses[0], losses[-1]],
            "max_relative_weight_change": max(rel),
        }
        return StageResult(model, stats)
