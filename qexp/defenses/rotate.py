"""defense=rotate: incoherence processing (SpinQuant / QuIP rotations) before the quantizer.

The rotations are llm-compressor's (`SpinQuantModifier`, `QuIPModifier` in
`llmcompressor.modifiers.transform`), built as the library builds them (its mappings, rotation
sites and transform types) and applied with compressed-tensors' transform factories, with one
addition: `seed` seeds the factories' generator (random signs of `random-hadamard`, the
matrices of `random-matrix`), which the library leaves at torch's default.

- `method=spinquant`, rotations R1 (residual stream: embedding, o/down outputs, q/k/v/gate/up/
  lm_head inputs) and R2 (per head: v outputs, o inputs) are fused into the weights: the
  defended model is a plain checkpoint every quantizer takes. The library first unties the
  word embeddings and fuses each RMSNorm's weight into the linears after it (exact). It also
  centres the embedding rows, which is exact for LayerNorm models only: on an RMSNorm model
  (Llama, SmolLM2) it moves the logits by 1.65 (fp32, embedded model), so
  `center_embeddings=false` (the default) leaves that step out; `true` runs it and the
  preservation check then stops the run unless `tolerance` is raised.
  R4 (down_proj inputs) is online: an activation rotation at every forward.
- `method=quip`: V rotates every linear's input (the weight side fused, the activation side
  online), U its output (fused, with an online inverse).

Online rotations are forward hooks on the model's modules, so they survive only a quantizer
that quantizes those modules in place (`Quantizer.keeps_hooks`: RTN); any other is refused
before loading. A rotated model is not the loaded checkpoint's parameter set (untied
embeddings, hooks), so neither it nor its quantized form is stored in the stage cache.

The adaptive attacks' surface (`attack.against=[rotate]`, qexp/attacks/adaptive.py): the
attacker rotates the model with the seed it believes the defender uses, attacks the rotated
model and delivers it rotated back (`unrotate_model`: the fused transforms, inverted).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

import torch
from torch import nn

from qexp.core.cache import digest
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.core.registry import options_where
from qexp.core.rotation import INSTALL, ONLINE, check_rotation, check_sizes, modifier
from qexp.defenses.base import Defense
from qexp.quantizers.base import Quantizer

DEFAULT_ROTATIONS = {"spinquant": ["R1", "R2"], "quip": ["v"]}
PRECISIONS = ("float64", "float32")
FUSED = ("weight_input", "weight_output")  # compressed-tensors' mergeable locations


@dataclass
class Rotate(Defense):
    """Rotate weights (and, for online rotations, activations) before quantizing."""

    name: str = "rotate"
    method: str = "spinquant"
    rotations: Optional[List[str]] = None  # null: the library's default for the method
    transform_type: str = "random-hadamard"
    block_size: Optional[int] = None  # null: full hidden size (R2: head_dim)
    seed: Optional[int] = 0  # null: drawn at defense time (an attacker cannot know it)
    precision: str = "float64"
    center_embeddings: bool = False
    tolerance: float = 5e-2
    check_preservation: bool = True

    preserves_function: ClassVar[bool] = True
    plain_output: ClassVar[bool] = False
    surface: ClassVar[Optional[str]] = "rotation"

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(DEFAULT_ROTATIONS))
        if self.rotations is None:
            self.rotations = list(DEFAULT_ROTATIONS[self.method])
        check_rotation("", self.method, self.rotations, self.transform_type)
        check_choice("precision", self.precision, PRECISIONS)
        if self.block_size is not None:
            check(self.block_size >= 2, "block_size", self.block_size, "null or an integer >= 2")
        check(self.tolerance > 0, "tolerance", self.tolerance, "a number > 0")
        check(
            not (self.center_embeddings and self.method != "spinquant"),
            "center_embeddings",
            self.center_embeddings,
            "false (only method=spinquant centres embeddings)",
        )

    # ---- capabilities ------------------------------------------------------------------
    @property
    def online(self) -> bool:
        """Whether some rotation stays an activation-side hook at inference."""
        return bool(ONLINE & set(self.rotations))

    def validate_environment(self) -> None:
        if importlib.util.find_spec("llmcompressor") is None:
            raise ConfigError("defense", self.name, f"another defense, or install: {INSTALL}")

    def check_spec(self, spec: Any) -> None:
        """Online rotations need a quantizer that keeps the model's modules (and hooks)."""
        if self.online and not spec.quantizer.keeps_hooks:
            keep = options_where("quantizer", lambda c: getattr(c, "keeps_hooks", False))
            raise ConfigError(
                "defense.rotations",
                self.rotations,
                f"offline rotations only (method=spinquant, rotations a subset of [R1, R2]) "
                f"under quantizer={spec.quantizer.name}, whose model does not keep online "
                f"rotation hooks; online rotations run with: {', '.join(keep)}",
            )

    def check_model(self, config: Any) -> None:
        """The transform sizes exist (`qexp.core.rotation.check_sizes`)."""
        check_sizes("defense.", config, self.rotations, self.transform_type, self.block_size)

    def preservation_tolerance(self) -> Optional[float]:
        return self.tolerance if self.check_preservation else None

    # ---- the rotation ------------------------------------------------------------------
    def modifier(self, model: nn.Module) -> Any:
        """llm-compressor's modifier for this config, initialised on `model` (its mappings
        and TransformConfig)."""
        from llmcompressor.core import State

        mod = modifier(
            self.method, self.rotations, self.transform_type, self.block_size, self.precision
        )
        mod.on_initialize(state=State(model=model))
        return mod

    def apply_config(self, model: nn.Module, config: Any, seed: int) -> None:
        """compressed-tensors' `apply_transform_config`, with each group's factory seeded."""
        from compressed_tensors.transform import TransformFactory

        for i, (name, scheme) in enumerate(config.config_groups.items()):
            factory = TransformFactory.from_scheme(scheme, name=name, seed=seed + i)
            factory.apply_to_model(model, use_tqdm=False)

    @torch.no_grad()
    def rotate_model(self, model: nn.Module, seed: int) -> None:
        """Rotate `model` in place as the library's modifier does (see the module doc)."""
        from llmcompressor.utils import untie_word_embeddings

        mod = self.modifier(model)
        if self.method == "spinquant":
            untie_word_embeddings(model)
            if self.center_embeddings:
                mod._center_embeddings(model)
            mod._fuse_norms(model)
        self.apply_config(model, mod.transform_config, seed)

    @torch.no_grad()
    def unrotate_model(self, model: nn.Module, seed: int) -> None:
        """Undo the fused rotations of `rotate_model(model, seed)` in place (the norms stay
        fused, the embeddings untied: the same function, a plain checkpoint)."""
        if self.online:
            raise ConfigError("defense.rotations", self.rotations, "offline rotations (R1, R2)")
        config = self.modifier(model).transform_config.model_copy(deep=True)
        for scheme in config.config_groups.values():
            scheme.apply = [
                a.model_copy(update={"inverse": not a.inverse})
                for a in scheme.apply
                if a.location in FUSED
            ]
        self.apply_config(model, config, seed)

    def seed_for(self, subject: Subject, ctx: RunContext) -> int:
        """The configured seed, or one drawn now from the run seed and the model's key."""
        if self.seed is not None:
            return self.seed
        return int(digest("defender", ctx.seed, subject.key)[:8], 16)

    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        seed = self.seed_for(subject, ctx)
        self.rotate_model(subject.model, seed)
        stats = {
            "method": self.method,
            "rotations": list(self.rotations),
            "transform_type": self.transform_type,
            "seed": seed,
            "seed_drawn": self.seed is None,
            "online": sorted(ONLINE & set(self.rotations)),
            "embeddings_centred": self.center_embeddings,
        }
        return StageResult(subject.model, stats)
