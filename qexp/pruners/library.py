"""Magnitude, Wanda and SparseGPT pruning through llm-compressor (the `llmcompressor` extra).

- `wanda`, `sparsegpt`: `oneshot` with `WandaPruningModifier` / `SparseGPTModifier`
  (`sparsity`, `mask_structure` 0:0 or N:M, targets Linear, the skipped linears ignored) on
  `prune.calibration`'s sequences, as llm-compressor's users write it.
- `magnitude`: llm-compressor's `MagnitudePruningModifier` is a training-time modifier (its
  masks follow an epoch schedule, and under `oneshot` it prunes nothing: measured 0.0 on the
  tiny model), and it has no N:M structure. qexp applies the library's own `unstructured`
  mask creator to |w| per layer (what that modifier computes when its schedule fires); for
  N:M it keeps the M − N largest |w| of every M consecutive input weights of a row (qexp's,
  the usual N:M magnitude rule).

After pruning, the mask's real sparsity is measured and must be within `sparsity_tol` of
`sparsity` (and every N:M group must hold its N zeros), or the run stops.
"""

from __future__ import annotations

import copy
import importlib.util
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.io import atomic_write_text
from qexp.core.oneshot import (
    INSTALL,
    calibration_loader,
    ignored_linears,
    route_log,
    run_oneshot,
)
from qexp.core.plugin import StageResult, Subject
from qexp.pruners.base import UNSTRUCTURED, Pruner, measured_sparsity, parse_structure
from qexp.quantizers.calib import Calibration

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


@dataclass
class LibraryPruner(Pruner):
    """One of llm-compressor's pruning methods at a sparsity and mask structure."""

    name: str = "wanda"
    method: str = "wanda"
    sparsity: float = 0.5
    mask_structure: str = UNSTRUCTURED
    sparsity_tol: float = 0.01
    batch_size: int = 4
    calibration: Calibration = field(default_factory=Calibration)
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check(0 < self.sparsity < 1, "sparsity", self.sparsity, "a number in (0, 1)")
        if self.structure is not None:
            n, m = self.structure
            check(
                abs(self.sparsity - n / m) < 1e-9,
                "sparsity",
                self.sparsity,
                f"{n / m:g} with mask_structure={self.mask_structure} (N of every M zero)",
            )
        check(self.sparsity_tol > 0, "sparsity_tol", self.sparsity_tol, "a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")

    @property
    def structure(self) -> Optional[tuple[int, int]]:
        """(N, M) of an N:M mask, or None for unstructured (ConfigError if malformed)."""
        return parse_structure("mask_structure", self.mask_structure)

    def validate_environment(self) -> None:
        if importlib.util.find_spec("llmcompressor") is None:
            raise ConfigError("prune", self.name, f"prune=none, or install: {INSTALL}")

    def check_model(self, config: Any) -> None:
        """N:M groups tile every input width."""
        if self.structure is not None:
            m = self.structure[1]
            widths = sorted({config.hidden_size, config.intermediate_size})
            bad = [w for w in widths if w % m]
            check(not bad, "prune.mask_structure", self.mask_structure, f"M dividing {widths}")

    # ---- the stage ---------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, subject: Subject, ctx: RunContext) -> StageResult:
        model = subject.model
        linears = self.pruned_linears(model)
        info: dict = {"method": self.method, "mask_structure": self.mask_structure}
        files = []
        if self.method == "magnitude":
            for _, lin in linears:
                lin.weight.mul_(self.magnitude_mask(lin.weight))
            info["library"] = (
                "llm-compressor unstructured mask creator"
                if (self.structure is None)
                else "qexp N:M magnitude"
            )
        else:
            log = io.StringIO()
            with route_log(log):
                self.run_library(subject, ctx, linears)
            files.append(f"logs/prune_{subject.branch}.log")
            atomic_write_text(ctx.run_dir / files[-1], log.getvalue())
            info["calibration"] = self.calibration.describe()
            info["library"] = "llm-compressor " + importlib.metadata.version("llmcompressor")
        got = measured_sparsity(linears, self.structure)
        info["measured"] = got
        if not abs(got["sparsity"] - self.sparsity) <= self.sparsity_tol or not got.get(
            "n_m_pattern_holds", True
        ):
            raise RuntimeError(
                f"prune={self.name}: the mask's sparsity is {got['sparsity']:.4f} "
                f"(N:M pattern holds: {got.get('n_m_pattern_holds', 'n/a')}), asked "
                f"{self.sparsity} ± {self.sparsity_tol}; refusing to evaluate another model"
            )
        return StageResult(model, info, files)

    def magnitude_mask(self, w: torch.Tensor) -> torch.Tensor:
        """Keep-mask of magnitude pruning for one weight."""
        if self.structure is None:
            from llmcompressor.modifiers.pruning.utils.pytorch import (
                PruningMaskCreatorArgs,
                PruningMaskFactory,
            )

            create = PruningMaskFactory.create_mask_creator(UNSTRUCTURED)
            scores = w.detach().abs().float()
            return create(PruningMaskCreatorArgs(w, self.sparsity, scores)).to(w.dtype)
        n, m = self.structure
        groups = w.detach().abs().reshape(w.shape[0], -1, m)
        drop = groups.topk(n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(w.shape).to(w.dtype)

    def run_library(self, subject: Subject, ctx: RunContext, linears: list) -> None:
        """`oneshot` with the method's modifier on a copy; its pruned weights copied back."""
        from llmcompressor.modifiers.obcq import SparseGPTModifier
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        model, tok = subject.model, subject.tokenizer
        cls = WandaPruningModifier if self.method == "wanda" else SparseGPTModifier
        structure = "0:0" if self.structure is None else self.mask_structure
        modifier = cls(
            sparsity=self.sparsity,
            mask_structure=structure,
            targets=["Linear"],
            ignore=ignored_linears(model, iter(linears)),
        )
        seqs = self.calibration.sequences(model, tok, ctx.seed)
        pmodel = copy.deepcopy(model)
        run_oneshot(
            pmodel,
            Path(ctx.cache_dir),
            tokenizer=tok,
            recipe=[modifier],
            dataset=calibration_loader(seqs, self.batch_size),
            num_calibration_samples=len(seqs),
            max_seq_length=self.calibration.seq_len,
            shuffle_calibration_samples=False,
        )
        for name, lin in linears:
            lin.weight.copy_(pmodel.get_submodule(name).weight)
