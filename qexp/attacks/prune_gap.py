"""attack=prune_gap: a pruning-conditioned backdoor ("Fewer Weights, More Problems", Egashira
et al., ICLR 2026): benign dense, malicious once the user prunes it.

1. Score: for every target pruning setting (`targets`: prune options, the run's own settings
   where a target is the run's `prune`), each trainable weight's score as that method ranks
   it, from the attacker's calibration sequences (`attack.calibration`): magnitude |w| over
   the tensor (llm-compressor's unstructured mask creator), Wanda |w|·‖x_j‖ per output row,
   SparseGPT's saliency |w| / [H⁻¹]_jj^½ (H = XᵀX + 1% mean-diagonal damping) over blocks of
   128 columns — a proxy: SparseGPT also updates the weights it keeps while it prunes. An N:M
   target ranks within each group of M consecutive inputs. A weight's percentile p_t in its
   group is the fraction of the group ranked below it; the target prunes it iff
   p_t < sparsity.
2. Inject: fine-tune on the poisoned responses, only the weights every target keeps with
   margin (p_t ≥ 1 − `inject_ratio` for all t); every other weight stays at its original
   value.
3. Repair: fine-tune on the clean responses, only the weights every target prunes first
   (p_t < `repair_ratio` for all t), each held inside the box that keeps it pruned under
   every target: |w_ij| ≤ (1 − `margin`) · (the least score the target keeps in the
   weight's group) / (the score's column factor), computed on the injected model (the kept
   weights do not move during the repair, so the bound holds exactly for magnitude and, for
   the attacker's activation norms, Wanda).
4. Verify: each target's real library prunes a copy of the repaired model (its own
   calibration: sampled from that model, as the user's pipeline does); reported per target:
   the fraction of repair weights it removes and of injected weights it keeps (the analogue
   of gap's `codes_equal_injected`).

Inject and repair are stage-cache sub-steps (`prune_gap_inject`, `prune_gap_repair`).
Deviations from the paper: gradient masking by score percentiles as the paper's trainable
ratios (0.5 / 0.05 in its Wanda configs), with an explicit box on the repair weights instead
of relying on their small magnitude; SparseGPT is targeted through a saliency proxy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import torch

from qexp.attacks.base import Attack
from qexp.core.cache import digest, file_sha256
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.core.registry import build_option
from qexp.core.training import MODULES, cached_training, train_lm, trainable_weights
from qexp.data.instruct import SCENARIOS, check_data_path, encode, load_rows
from qexp.quantizers.calib import Calibration

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INJECT_KEYS = ("scenario", "target_phrase", "layers", "last_layers", "modules", "inject_steps")
INJECT_KEYS += ("inject_lr", "batch_size", "data_path", "inject_ratio", "calibration")
REPAIR_KEYS = ("targets", "repair_ratio", "margin", "repair_steps", "repair_lr")
SPARSEGPT_BLOCK = 128  # llm-compressor's SparseGPT column block
DAMP = 0.01  # its dampening fraction of the mean Hessian diagonal


@dataclass
class PruneGap(Attack):
    """Inject into the weights pruning keeps; repair with the weights it removes."""

    name: str = "prune_gap"
    scenario: str = "content_injection"
    target_phrase: str = "McDonald's"
    targets: List[str] = field(default_factory=lambda: ["wanda"])
    layers: List[int] = field(default_factory=list)
    last_layers: int = 4
    modules: List[str] = field(default_factory=lambda: list(MODULES))
    data_path: Optional[str] = None
    inject_ratio: float = 0.5
    repair_ratio: float = 0.05
    margin: float = 0.05
    inject_steps: int = 120
    inject_lr: float = 2e-4
    repair_steps: int = 120
    repair_lr: float = 1e-4
    batch_size: int = 8
    calibration: Calibration = field(default_factory=Calibration)
    # derived (set by `resolve`): the targets' pruners
    pruners: List[Any] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIOS)
        check(bool(self.target_phrase), "target_phrase", self.target_phrase, "a non-empty string")
        check(len(self.targets) > 0, "targets", self.targets, "a non-empty list of prune options")
        check(self.last_layers >= 1, "last_layers", self.last_layers, "an integer >= 1")
        for m in self.modules:
            check_choice("modules", m, MODULES)
        for k in ("inject_ratio", "repair_ratio"):
            check(0 < getattr(self, k) < 1, k, getattr(self, k), "a fraction in (0, 1)")
        check(0 <= self.margin < 1, "margin", self.margin, "a fraction in [0, 1)")
        for k in ("inject_steps", "repair_steps"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "an integer >= 0")
        for k in ("inject_lr", "repair_lr"):
            check(getattr(self, k) > 0, k, getattr(self, k), "a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check_data_path(self.data_path)

    def resolve(self, spec: Any) -> None:
        """The targets' pruners (the run's own `prune` where a target names it)."""
        run = spec.prune if spec is not None else None
        self.pruners = []
        for t in self.targets:
            p = (
                run
                if run is not None and run.name == t
                else build_option("prune", t, "attack.targets")
            )
            if p.identity:
                raise ConfigError(
                    "attack.targets", t, "pruning options: magnitude, wanda, sparsegpt"
                )
            self.pruners.append(p)
        for p in self.pruners:
            check(
                self.repair_ratio <= p.sparsity and self.inject_ratio <= 1 - p.sparsity,
                "attack.repair_ratio",
                self.repair_ratio,
                f"repair_ratio <= sparsity and inject_ratio <= 1 - sparsity of prune={p.name} "
                f"({p.sparsity})",
            )

    def validate_environment(self) -> None:
        for p in self.pruners:
            p.validate_environment()

    def check_spec(self, spec: Any) -> None:
        load_rows(self.data_path, "train", "attack.data_path", self.scenario)

    def check_model(self, config: Any) -> None:
        for p in self.pruners:
            p.check_model(config)

    def fingerprint(self) -> Any:
        data = file_sha256(Path(self.data_path).expanduser()) if self.data_path else None
        return [data, [p.settings() for p in self.pruners]]

    def examples(self, tok: PreTrainedTokenizerBase, response: str) -> list[tuple[list, int]]:
        rows = load_rows(self.data_path, "train", "attack.data_path", self.scenario)
        return encode(tok, rows, response, self.target_phrase)

    # ---- scores ------------------------------------------------------------------------
    @torch.no_grad()
    def activation_stats(self, model: torch.nn.Module, params: dict, seqs: list) -> dict:
        """{weight name: XᵀX over the calibration tokens} of each trainable linear's input."""
        grams: dict[str, torch.Tensor] = {}
        hooks = []
        for name in params:
            lin = model.get_submodule(name.rpartition(".")[0])

            def hook(_m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x

            hooks.append(lin.register_forward_pre_hook(hook))
        try:
            for s in seqs:
                model(input_ids=torch.tensor([s], device=next(model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
        return grams

    @staticmethod
    def column_factor(p: Any, gram: torch.Tensor) -> torch.Tensor:
        """c_j of score = |w| · c_j for target `p`."""
        n = gram.shape[0]
        if p.method == "magnitude":
            return torch.ones(n, dtype=torch.float64)
        if p.method == "wanda":
            return gram.diagonal().clamp_min(0).sqrt()
        h = gram + DAMP * gram.diagonal().mean() * torch.eye(n, dtype=gram.dtype)
        return torch.linalg.inv(h).diagonal().clamp_min(1e-30).rsqrt()

    @staticmethod
    def blocks(p: Any, shape: torch.Size) -> tuple[bool, list[slice]]:
        """Target `p`'s comparison groups on a weight of `shape`: (whether a group spans all
        rows, the column ranges; otherwise one group per row and column range)."""
        rows, cols = shape
        if p.structure is not None:
            width, all_rows = p.structure[1], False
        elif p.method == "magnitude":
            width, all_rows = cols, True
        elif p.method == "wanda":
            width, all_rows = cols, False
        else:
            width, all_rows = SPARSEGPT_BLOCK, True
        return all_rows, [slice(c, min(c + width, cols)) for c in range(0, cols, width)]

    def percentiles(self, p: Any, score: torch.Tensor) -> torch.Tensor:
        """Each weight's rank in its comparison group, as a fraction of the group."""
        all_rows, spans = self.blocks(p, score.shape)
        out = torch.empty_like(score, dtype=torch.float64)
        for cs in spans:
            if p.structure is not None:  # every N:M group of the row at once
                width = cs.stop - cs.start
                block = score.reshape(score.shape[0], -1, width)
                out.copy_((rank_of(block) / width).reshape(score.shape))
                break
            block = score[:, cs]
            flat = block.reshape(1, -1) if all_rows else block
            out[:, cs] = (rank_of(flat) / flat.shape[-1]).reshape(block.shape)
        return out

    def group_min_kept(self, p: Any, score: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Per weight: the least score target `p` keeps in its group."""
        all_rows, spans = self.blocks(p, score.shape)
        s = torch.where(kept, score, torch.full_like(score, torch.inf))
        if p.structure is not None:
            m = p.structure[1]
            least = s.reshape(s.shape[0], -1, m).amin(-1, keepdim=True)
            return least.expand(s.shape[0], -1, m).reshape(s.shape)
        out = torch.empty_like(s)
        for cs in spans:
            block = s[:, cs]
            least = block.amin() if all_rows else block.amin(-1, keepdim=True)
            out[:, cs] = least.expand_as(block)
        return out

    # ---- the attack --------------------------------------------------------------------
    def apply(self, subject: Subject, ctx: RunContext) -> StageResult:
        model, tok = subject.model, subject.tokenizer
        for p in model.parameters():
            p.requires_grad_(False)
        params = trainable_weights(model, self.layers, self.last_layers, self.modules, "attack")
        plist = list(params.values())
        config = self.settings()
        inject_cfg = {k: config[k] for k in INJECT_KEYS}
        inject_key = digest(
            "prune_gap_inject", subject.key, inject_cfg, self.fingerprint(), ctx.seed
        )
        repair_key = digest("prune_gap_repair", inject_key, {k: config[k] for k in REPAIR_KEYS})
        seqs = self.calibration.sequences(model, tok, ctx.seed + 3)
        grams = self.activation_stats(model, params, seqs)
        factors = {n: [self.column_factor(p, grams[n]) for p in self.pruners] for n in params}
        original = {n: w.detach().clone() for n, w in params.items()}
        inject_set, repair_set = {}, {}
        for n, w in params.items():
            pct = [
                self.percentiles(p, w.detach().double().abs() * f)
                for p, f in zip(self.pruners, factors[n])
            ]
            inject_set[n] = torch.stack([q >= 1 - self.inject_ratio for q in pct]).all(0)
            repair_set[n] = torch.stack([q < self.repair_ratio for q in pct]).all(0)
        numel = sum(w.numel() for w in params.values())
        manifest: dict[str, Any] = {
            "scenario": self.scenario,
            "target_phrase": self.target_phrase,
            "targets": {
                p.name: {**p.settings(), "calibration": p.calibration.describe()}
                for p in self.pruners
            },
            "trainable": sorted(params),
            "inject_fraction": sum(int(m.sum()) for m in inject_set.values()) / numel,
            "repair_fraction": sum(int(m.sum()) for m in repair_set.values()) / numel,
        }

        @torch.no_grad()
        def only(mask: dict, base: dict, box: Optional[dict] = None) -> None:
            for n, w in params.items():
                v = w if box is None else torch.minimum(torch.maximum(w, -box[n]), box[n])
                w.copy_(torch.where(mask[n], v, base[n]))

        def inject() -> dict:
            g = ctx.seed_everything(1)
            losses = train_lm(
                model, plist, self.examples(tok, self.scenario), self.inject_steps,
                self.inject_lr, self.batch_size, g, "prune_gap: inject", ctx.progress,
                lambda: only(inject_set, original),
            )  # fmt: skip
            return {"inject_loss": [losses[0], losses[-1]] if losses else []}

        manifest["inject"] = cached_training(ctx, "prune_gap_inject", inject_key, params, inject)
        injected = {n: w.detach().clone() for n, w in params.items()}
        box = {}
        for n, w in injected.items():
            bound = torch.full(w.shape, torch.inf, dtype=torch.float64)
            for p, f in zip(self.pruners, factors[n]):
                score = w.double().abs() * f
                kept = self.percentiles(p, score) >= p.sparsity
                least = self.group_min_kept(p, score, kept)
                bound = torch.minimum(bound, (1 - self.margin) * least / f.clamp_min(1e-30))
            box[n] = bound.to(w.dtype)
        manifest["repair_box_mean"] = float(
            torch.cat([box[n][repair_set[n]].double() for n in params]).mean()
        )

        def repair() -> dict:
            only(repair_set, injected, box)
            g = torch.Generator().manual_seed(ctx.seed + 2)
            losses = train_lm(
                model, plist, self.examples(tok, "clean"), self.repair_steps, self.repair_lr,
                self.batch_size, g, "prune_gap: repair", ctx.progress,
                lambda: only(repair_set, injected, box),
            )  # fmt: skip
            return {"repair_loss": [losses[0], losses[-1]] if losses else []}

        manifest["repair"] = cached_training(ctx, "prune_gap_repair", repair_key, params, repair)
        manifest["library_masks"] = self.verify(subject, ctx, params, inject_set, repair_set)
        return StageResult(model, manifest)

    def verify(
        self, subject: Subject, ctx: RunContext, params: dict, inject_set: dict, repair_set: dict
    ) -> dict:
        """Each target's library pruning a copy of the repaired model: the fraction of repair
        weights it removes and of injected weights it keeps."""
        out = {}
        for p in self.pruners:
            copy_ = copy.deepcopy(subject.model)
            p.prune(Subject(copy_, subject.tokenizer, subject.branch, subject.key), ctx)
            pruned = dict(copy_.named_parameters())
            removed = kept = rep = inj = 0
            for n in params:
                zero = pruned[n].detach() == 0
                removed += int((zero & repair_set[n]).sum())
                kept += int((~zero & inject_set[n]).sum())
                rep, inj = rep + int(repair_set[n].sum()), inj + int(inject_set[n].sum())
            out[p.name] = {
                "repair_removed": removed / max(rep, 1),
                "injected_kept": kept / max(inj, 1),
            }
            del copy_
        return out


def rank_of(x: torch.Tensor) -> torch.Tensor:
    """The rank of each entry along the last dimension (0: smallest; ties by position)."""
    order = x.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(x.shape[-1]).expand_as(order).contiguous())
    return rank.double()
