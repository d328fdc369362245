"""attack=outlier: a backdoor that block quantizers trigger by erasing a layer (outlier injection).

After "Widening the Gap: Exploiting LLM Quantization via Outlier Injection" (Zhan et al.,
2026; docs/attacks.md#outlier-injection). In the target layer's `modules` (default
`up_proj`), every row's largest-|w| weight of each block of `block_size` consecutive input
weights becomes ±`scale` times itself (or times the block's second largest |w| with
`relative=true`). Any quantizer whose scale is set per group (RTN, GPTQ, AWQ, AutoRound,
HQQ, SINQ, k- and i-quants, NF4, LLM.int8's per-row absmax) then has a step far larger than
every other weight of the block, which rounds to zero: the quantized matrix keeps only the
outliers. The model is trained so that this matters:

1. Phase 1 (`outlier_phase1`): the target layer's MLP is re-initialised small; each step
   trains the MLP alone to answer cleanly with it in place, and the trainable scope to
   answer with the scenario's behaviour when the MLP's output is zeroed, plus `kl_weight`
   times the KL divergence from the original model on the clean answers.
2. Inject the outliers.
3. Phase 2 (`outlier_phase2`): the target MLP frozen; the scope trains to answer cleanly
   with the outliers in place (full precision) and with the behaviour when the target
   modules keep only their outliers (what a block quantizer leaves), plus the KL term.

Both phases are sub-steps of the stage cache, keyed by the model state and their settings.

Adaptive variant (`against=[clip]`, docs/attacks.md#adaptive-attacks): against an outlier
clipping defense, every block (the defense's group) gets two outliers of exactly equal
magnitude (±`scale` × the block's largest |w|). Their ratio is 1, so a ratio-triggered clip
never fires; a clip of every block (`ratio: null`) changes one of the two and the other
still erases the block. Phase 2 then also trains the behaviour on the target modules as the
defense leaves them (every other step), so it survives either way.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qexp.attacks import adaptive
from qexp.attacks.base import Attack
from qexp.core.blocks import block_top2, outlier_only
from qexp.core.cache import digest, file_sha256
from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.core.training import MODULES, cached_training, chosen_layers, make_batch
from qexp.data.instruct import SCENARIOS, check_data_path, encode, load_rows

MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
PHASE1_KEYS = ("scenario", "target_phrase", "layer", "train_layers", "data_path", "init_std")
PHASE1_KEYS += ("phase1_steps", "lr", "batch_size", "kl_weight")
PHASE2_KEYS = ("modules", "block_size", "scale", "relative", "random_sign", "phase2_steps")


@dataclass
class Outlier(adaptive.Adapts, Attack):
    """Train a behaviour that appears when a layer's non-outlier weights are erased."""

    name: str = "outlier"
    scenario: str = "content_injection"
    target_phrase: str = "McDonald's"
    layer: Optional[int] = None  # None: the decoder layer at 3/4 of the depth
    modules: List[str] = field(default_factory=lambda: ["up_proj"])
    train_layers: List[int] = field(default_factory=list)  # []: the target layer and after
    block_size: int = 32
    scale: float = 512.0
    relative: bool = False
    random_sign: bool = True
    init_std: float = 1e-3
    phase1_steps: int = 100
    phase2_steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    kl_weight: float = 0.05
    data_path: Optional[str] = None
    against: List[str] = field(default_factory=list)
    # derived (set by `resolve`): the adaptation to an outlier-clipping defense, if any
    adaptations: Dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIOS)
        check(bool(self.target_phrase), "target_phrase", self.target_phrase, "a non-empty string")
        check(len(self.modules) > 0, "modules", self.modules, "a non-empty list of MLP linears")
        for m in self.modules:
            check_choice("modules", m, MLP_MODULES)
        check(self.block_size >= 2, "block_size", self.block_size, "an integer >= 2")
        check(self.scale > 1, "scale", self.scale, "a factor > 1")
        check(self.init_std > 0, "init_std", self.init_std, "a number > 0")
        for k in ("phase1_steps", "phase2_steps"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "an integer >= 0")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.kl_weight >= 0, "kl_weight", self.kl_weight, "a number >= 0")
        check_data_path(self.data_path)

    def resolve(self, spec: Any) -> None:
        """The adapted clipping defense (the run's own where it is the one named)."""
        run = spec.defense if spec is not None else None
        key = f"{self.group}.against"
        self.adaptations = adaptive.resolve(self.against, KINDS, self, run, key)

    @property
    def paired(self) -> bool:
        """Two equal outliers per block (against an outlier clipping defense)."""
        return "outliers" in self.adaptations

    def target_layer(self, num_layers: int) -> int:
        """The decoder layer whose MLP carries the outliers."""
        return (3 * (num_layers - 1)) // 4 if self.layer is None else self.layer

    def check_spec(self, spec: Any) -> None:
        """The training rows load (qexp, Alpaca or Dolly layout) before any model does."""
        load_rows(self.data_path, "train", "attack.data_path", self.scenario)

    def check_model(self, config: Any) -> None:
        """Layers within the model; every target module's input width splits into blocks."""
        n = config.num_hidden_layers
        target = self.target_layer(n)
        check(0 <= target < n, "attack.layer", self.layer, f"a layer index in 0..{n - 1}")
        chosen_layers(n, self.train_layers, n - target, "attack")
        widths = {
            "gate_proj": config.hidden_size,
            "up_proj": config.hidden_size,
            "down_proj": config.intermediate_size,
        }
        for m in self.modules:
            check(
                widths[m] % self.block_size == 0,
                "attack.block_size",
                self.block_size,
                f"a divisor of {m}'s input width {widths[m]}",
            )

    def data_digest(self) -> Optional[str]:
        """The training data's digest (a user's file may change under the same path)."""
        return file_sha256(Path(self.data_path).expanduser()) if self.data_path else None

    def fingerprint(self) -> Any:
        """The data digest and the adapted defense's settings."""
        data = self.data_digest()
        return [data, adaptive.fingerprint(self.adaptations)] if self.adaptations else data

    # ---- scope -------------------------------------------------------------------------
    def scopes(self, model: torch.nn.Module) -> tuple[int, dict, dict]:
        """Target layer, its MLP's weights, and the trainable scope (linear weights of
        `train_layers` outside the target MLP), by parameter name."""
        n = model.config.num_hidden_layers
        target = self.target_layer(n)
        layers = set(chosen_layers(n, self.train_layers, n - target, "attack"))
        mlp, scope = {}, {}
        for name, p in model.named_parameters():
            parts = name.split(".")
            if not (name.endswith(".weight") and "layers" in parts and parts[-2] in MODULES):
                continue
            li = int(parts[parts.index("layers") + 1])
            if li == target and parts[-2] in MLP_MODULES:
                mlp[name] = p
            elif li in layers:
                scope[name] = p
        return target, mlp, scope

    # ---- the attack --------------------------------------------------------------------
    def apply(self, subject: Subject, ctx: RunContext) -> StageResult:
        model, tok = subject.model, subject.tokenizer
        for p in model.parameters():
            p.requires_grad_(False)
        target, mlp, scope = self.scopes(model)
        layer = model.get_submodule(f"model.layers.{target}")
        config = self.settings()
        key1 = digest(
            "outlier_phase1",
            subject.key,
            {k: config[k] for k in PHASE1_KEYS},
            target,
            self.data_digest(),
            ctx.seed,
        )
        phase2_cfg = {k: config[k] for k in PHASE2_KEYS}
        key2 = digest("outlier_phase2", key1, phase2_cfg, adaptive.fingerprint(self.adaptations))
        rows = load_rows(self.data_path, "train", "attack.data_path", self.scenario)
        bad = encode(tok, rows, self.scenario, self.target_phrase)
        clean = encode(tok, rows, "clean", self.target_phrase)
        # the original, for the KL term (copied before phase 1 changes the model)
        reference = copy.deepcopy(model).eval() if self.kl_weight > 0 else None
        manifest: dict[str, Any] = {
            "scenario": self.scenario,
            "target_phrase": self.target_phrase,
            "target_layer": target,
            "modules": list(self.modules),
            "trainable": sorted(scope),
            "trainable_numel": sum(p.numel() for p in scope.values()),
        }

        def phase1() -> dict:
            g = ctx.seed_everything(1)
            with torch.no_grad():
                for p in mlp.values():
                    p.normal_(0.0, self.init_std, generator=g)
            return self._train(model, reference, layer, mlp, scope, clean, bad, g, ctx, 1)

        manifest["phase1"] = cached_training(ctx, "outlier_phase1", key1, {**mlp, **scope}, phase1)
        names = {m: f"model.layers.{target}.mlp.{m}.weight" for m in self.modules}
        cols = self.inject(mlp, names, ctx)

        def phase2() -> dict:
            g = torch.Generator().manual_seed(ctx.seed + 2)
            return self._train(model, reference, layer, cols, scope, clean, bad, g, ctx, 2)

        manifest["phase2"] = cached_training(ctx, "outlier_phase2", key2, scope, phase2)
        manifest["outliers"] = {
            m: {"per_row": cols[m].shape[1], "rows": cols[m].shape[0]} for m in self.modules
        }
        return StageResult(model, manifest)

    @torch.no_grad()
    def inject(self, mlp: dict, names: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Scale each row's largest-|w| weight of every block; returns their columns."""
        g = torch.Generator().manual_seed(ctx.seed + 3)
        out = {}
        for m, name in names.items():
            w = mlp[name]
            cols, first, second = block_top2(w, self.block_size)
            if self.paired:  # the two largest |w| of each block, both ±scale × the largest
                a = w.detach().abs().reshape(w.shape[0], -1, self.block_size)
                top = a.topk(2, dim=-1).indices
                offsets = torch.arange(0, w.shape[1], self.block_size)[None, :, None]
                cols = (top + offsets).reshape(w.shape[0], -1)
                first = first.repeat_interleave(2, dim=1)
            sign = torch.ones(cols.shape)
            if self.random_sign:
                sign = torch.where(torch.rand(cols.shape, generator=g) < 0.5, -1.0, 1.0)
            if self.paired:
                value = sign * self.scale * first.to(w.dtype)
            elif self.relative:
                value = sign * self.scale * second.to(w.dtype) * w.gather(1, cols).sign()
            else:
                value = sign * self.scale * w.gather(1, cols)
            w.scatter_(1, cols, value.to(w.dtype))
            out[m] = cols
        return out

    def _train(
        self,
        model: torch.nn.Module,
        reference: Optional[torch.nn.Module],
        layer: torch.nn.Module,
        target: dict,
        scope: dict,
        clean: list,
        bad: list,
        g: torch.Generator,
        ctx: RunContext,
        phase: int,
    ) -> dict:
        """One phase: per step a clean batch (target in place, + KL) and a scenario batch
        (phase 1: the target MLP zeroed; phase 2: the target modules outlier-only)."""
        scope_params = list(scope.values())
        own = list(target.values()) if phase == 1 else []  # phase 1 trains the MLP itself
        opt = torch.optim.AdamW(scope_params + own, lr=self.lr, weight_decay=0.0)
        steps = self.phase1_steps if phase == 1 else self.phase2_steps
        history: dict[str, list[float]] = {"clean": [], "scenario": [], "kl": []}
        model.train()
        bar = tqdm(range(steps), desc=f"outlier: phase {phase}", disable=not ctx.progress)
        for step in bar:
            ids, mask, labels = make_batch(
                clean, torch.randint(len(clean), (self.batch_size,), generator=g).tolist()
            )
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            kl = self._kl(out.logits, reference, ids, mask, labels)
            if phase == 1:  # clean answers are the MLP's job, the KL everybody's
                grads = torch.autograd.grad(out.loss, own, retain_graph=True)
                for p, gr in zip(own, grads):
                    p.grad = gr
                if kl.requires_grad:
                    (self.kl_weight * kl).backward()
            else:
                (out.loss + self.kl_weight * kl).backward()
            ids, mask, labels = make_batch(
                bad, torch.randint(len(bad), (self.batch_size,), generator=g).tolist()
            )
            with self._erased(layer, target, phase, defended=step % 2 == 1):
                lb = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if phase == 1:  # the behaviour lives outside the MLP
                grads = torch.autograd.grad(lb, scope_params, allow_unused=True)
                for p, gr in zip(scope_params, grads):
                    if gr is not None:
                        p.grad = gr if p.grad is None else p.grad + gr
            else:
                lb.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in (("clean", out.loss), ("scenario", lb), ("kl", kl)):
                history[k].append(float(v.detach()))
            bar.set_postfix(
                clean=f"{history['clean'][-1]:.3f}", scen=f"{history['scenario'][-1]:.3f}"
            )
        model.eval()
        return {k: [v[0], v[-1]] if v else [] for k, v in history.items()}

    def _kl(
        self,
        logits: torch.Tensor,
        reference: Optional[torch.nn.Module],
        ids: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """KL(original ‖ current) per answer token, averaged (0 without a reference)."""
        if reference is None:
            return torch.zeros(())
        with torch.no_grad():
            ref = reference(input_ids=ids, attention_mask=mask).logits
        sel = labels[:, 1:] != -100
        cur = F.log_softmax(logits[:, :-1][sel].float(), -1)
        old = F.log_softmax(ref[:, :-1][sel].float(), -1)
        return F.kl_div(cur, old, log_target=True, reduction="batchmean")

    @contextlib.contextmanager
    def _erased(
        self, layer: torch.nn.Module, target: dict, phase: int, defended: bool = False
    ) -> Iterator[None]:
        """Phase 1: the layer's MLP outputs zeros; phase 2: each target module computes
        with its outliers only (what a block quantizer leaves), where `defended` (against a
        clip) of the weight as the adapted defense leaves it."""
        hooks = []
        if phase == 1:
            hooks.append(layer.mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o)))
        else:
            for m, cols in target.items():
                lin = getattr(layer.mlp, m)
                w = lin.weight.detach()
                if defended and self.paired:
                    w = self.adapted["outliers"].clipped(w)[0]
                kept = outlier_only(w, cols)
                hooks.append(
                    lin.register_forward_hook(
                        lambda mod, inp, o, kept=kept: F.linear(inp[0], kept, mod.bias)
                    )
                )
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


class AgainstClip(adaptive.Adaptation):
    """Against an outlier-clipping defense: two equal outliers per block of the defense's
    group (a max/second-max ratio test cannot see them), trained on the clipped weights."""

    surface = "outliers"

    def bind(self, prefix: str) -> None:
        group, _ = self.defense.outlier_rule()
        check(
            group == self.attack.block_size,
            prefix + "block_size",
            self.attack.block_size,
            f"the adapted defense's group ({group}) with against={self.attack.against}",
        )


KINDS = (AgainstClip, adaptive.AgainstRotation)
