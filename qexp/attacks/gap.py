"""attack=gap: a quantization-conditioned backdoor (ELQ, "Exploiting LLM Quantization").

1. Inject: fine-tune the trainable scope on the poisoned responses (malicious in full
   precision).
2. Box: for every target quantizer (conf/quantizer/<name>, grid quantizers only), the
   preserving interval of each trainable weight of the injected model (scale-setting weights
   pinned, qexp/quantizers/intervals.py); intersect across targets; keep `box_margin` of
   each box's width away from its edges.
3. Repair: fine-tune on the clean responses with projected gradient descent: after every
   optimizer step each weight is clamped into its box. Full precision becomes benign while
   every target quantizer still produces exactly the injected model's codes; this is
   checked with each library's own codes (`tensor_codes`) and a failure stops the run.
   Targets whose boxes are a heuristic (llama.cpp's k-/i-quants, HQQ, SINQ;
   `exact_boxes=False`) are verified with the library instead: every block whose codes
   changed is reset to the injected weights (llama.cpp encodes blocks independently, so this
   restores them exactly; where reset blocks still differ, what the library couples is reset:
   a SINQ tile, then the whole tensor, as hqq's early stopping requires), and the fraction
   verified before the reset is reported.

Adaptive variants (`against`: defense options, docs/attacks.md#adaptive-attacks):
- a noise defense: the injection trains under that defense's own noise (each step at
  weights + N(0, σ_ℓ²), `noise_train`), and every box keeps `noise_margin` σ_ℓ from its edges
  (a box narrower than that collapses to its centre);
- a canonicalizing defense: the whole model is canonicalized first, and only the modules
  none of its symmetries touches train (gate_proj for parts vo, qk, mlp), so the
  defender's canonicalization is the identity on the attacked model up to rounding; how
  many library codes it still changes is measured and reported. (Training inside the
  symmetries and re-canonicalizing after every step does not get there: V/O's balanced
  basis is not continuous in the weights, docs/attacks.md#adaptive-attacks);
- a rounding-flip defense (quantguard): every box also keeps the weight's rounding error at
  most `tie_keep` × τ of the step to its neighbouring grid point, so no weight of the
  backdoor is a near tie.

Only linear weights of the chosen decoder layers train (the quantized ones); everything else
stays frozen. Inject and repair are sub-steps of the stage cache (`gap_inject`,
`gap_repair`): the injected weights are re-used when only the repair settings change.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from qexp.attacks import adaptive
from qexp.attacks.base import Attack
from qexp.core.cache import digest, file_sha256
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.plugin import StageResult, Subject
from qexp.core.training import MODULES, cached_training, chosen_layers, train_lm, trainable_weights
from qexp.data.instruct import SCENARIOS, check_data_path, encode, load_rows
from qexp.quantizers.base import Boxes, GridQuantizer, target_quantizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# the linears each canonicalization symmetry rescales or rotates (qexp/defenses/canonicalize.py)
SYMMETRY_MODULES = {
    "vo": ("v_proj", "o_proj"),
    "qk": ("q_proj", "k_proj"),
    "mlp": ("up_proj", "down_proj"),
    "norm": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
}

INJECT_KEYS = ("scenario", "target_phrase", "layers", "last_layers", "modules", "inject_steps")
INJECT_KEYS += ("inject_lr", "batch_size", "data_path", "against", "noise_train")
REPAIR_KEYS = ("targets", "box_margin", "repair_steps", "repair_lr", "noise_margin", "tie_keep")


def near_ties(q: GridQuantizer, w: torch.Tensor, tau: float) -> tuple[int, int]:
    """(near ties, candidates) as quantguard counts them: of the non-pinned weights with a
    neighbouring grid point on their side, those whose rounding error exceeds τ of the step."""
    deq = q.fake_quant(w).double()
    down, up = (t.double() for t in q.neighbours(w))
    lo, hi = q.intervals(w)
    wd = w.double()
    step = torch.where(wd >= deq, up - deq, down - deq).abs()
    choice = (lo < hi) & (step != 0)
    return int((choice & ((wd - deq).abs() > tau * step)).sum()), int(choice.sum())


@dataclass
class Gap(adaptive.Adapts, Attack):
    """Inject a behaviour, then repair full precision inside the targets' quantization boxes."""

    name: str = "gap"
    scenario: str = "content_injection"
    target_phrase: str = "McDonald's"
    targets: List[str] = field(default_factory=lambda: ["bnb_nf4"])
    layers: List[int] = field(default_factory=list)
    last_layers: int = 4
    modules: List[str] = field(default_factory=lambda: list(MODULES))
    data_path: Optional[str] = None
    inject_steps: int = 120
    inject_lr: float = 2e-4
    repair_steps: int = 120
    repair_lr: float = 1e-4
    batch_size: int = 8
    box_margin: float = 0.05
    against: List[str] = field(default_factory=list)
    noise_margin: float = 1.0
    noise_train: bool = True
    tie_keep: float = 0.75
    # derived (set by `resolve`): the targets' quantizers and one adaptation per surface
    quantizers: List[Any] = field(default_factory=list, init=False, repr=False)
    adaptations: Dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIOS)
        check(bool(self.target_phrase), "target_phrase", self.target_phrase, "a non-empty string")
        check(len(self.targets) > 0, "targets", self.targets, "a non-empty list of quantizers")
        check(self.last_layers >= 1, "last_layers", self.last_layers, "an integer >= 1")
        for m in self.modules:
            check_choice("modules", m, MODULES)
        for k in ("inject_steps", "repair_steps"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "an integer >= 0")
        for k in ("inject_lr", "repair_lr"):
            check(getattr(self, k) > 0, k, getattr(self, k), "a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(0 <= self.box_margin < 0.5, "box_margin", self.box_margin, "a fraction in [0, 0.5)")
        check(self.noise_margin >= 0, "noise_margin", self.noise_margin, "a number >= 0 (in σ)")
        check(0 <= self.tie_keep <= 1, "tie_keep", self.tie_keep, "a fraction in [0, 1]")
        check_data_path(self.data_path)

    def resolve(self, spec: Any) -> None:
        """The targets' quantizers, and the adapted defenses (the run's own where it is the
        one named)."""
        self.quantizers = [target_quantizer(t, f"{self.group}.targets") for t in self.targets]
        run = spec.defense if spec is not None else None
        key = f"{self.group}.against"
        self.adaptations = adaptive.resolve(self.against, ADAPTATIONS, self, run, key)

    def validate_environment(self) -> None:
        """Every target's library is installed."""
        for q in self.quantizers:
            try:
                q.validate_environment()
            except ConfigError as e:
                raise ConfigError("attack.targets", q.name, e.allowed) from None

    def check_spec(self, spec: Any) -> None:
        """The training rows load (qexp, Alpaca or Dolly layout) before any model does."""
        load_rows(self.data_path, "train", "attack.data_path", self.scenario)

    def check_model(self, config: Any) -> None:
        """Layers within the model; every target's grid fits its linears."""
        chosen_layers(config.num_hidden_layers, self.layers, self.last_layers, "attack")
        for q in self.quantizers:
            try:
                q.check_model(config)
            except ConfigError as e:
                raise ConfigError("attack.targets", q.name, e.allowed) from None

    def fingerprint(self) -> Any:
        """The training data's digest (a user's file may change under the same path), the
        targets' own fingerprints (llama.cpp's ggml build) and the adapted defenses' settings."""
        data = file_sha256(Path(self.data_path).expanduser()) if self.data_path else None
        targets = [q.fingerprint() for q in self.quantizers]
        adapted = adaptive.fingerprint(self.adaptations) if self.adaptations else None
        return [data, targets, adapted]

    # ---- scope -------------------------------------------------------------------------
    def trained_modules(self) -> list[str]:
        """`modules`, minus those an adapted defense must not see trained (against a
        canonicalizing defense: every module one of its symmetries touches)."""
        modules = list(self.modules)
        for a in self.adaptations.values():
            modules = a.trained(modules)
        return modules

    def scope(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The trainable linear weights, by parameter name."""
        modules = self.trained_modules()
        return trainable_weights(model, self.layers, self.last_layers, modules, "attack")

    # ---- data --------------------------------------------------------------------------
    def examples(self, tok: PreTrainedTokenizerBase, response: str) -> list[tuple[list, int]]:
        """(token ids, prompt length) per training row, for `response` = a scenario or clean."""
        rows = load_rows(self.data_path, "train", "attack.data_path", self.scenario)
        return encode(tok, rows, response, self.target_phrase)

    # ---- boxes -------------------------------------------------------------------------
    def boxes(
        self, params: dict[str, torch.nn.Parameter], targets: list[Boxes], margins: dict
    ) -> tuple[dict, dict, dict]:
        """Intersection of the targets' boxes (raw, as the libraries round), and those shrunk
        by `box_margin` of their width, by at least `margins` (by name: the adapted noise
        defense's `noise_margin` σ) and by what the adapted defenses require (a rounding-flip
        defense: rounding errors of at most `tie_keep` τ). A box that shrinks to nothing
        becomes the single point at its centre."""
        out, raw = {}, {}
        collapsed = 0
        for name, p in params.items():
            w = p.detach()
            lo = torch.full(p.shape, -torch.inf, dtype=torch.float64)
            hi = torch.full(p.shape, torch.inf, dtype=torch.float64)
            for q in targets:
                try:
                    qlo, qhi = q.tensor_box(name, w)
                except ValueError as e:
                    raise ConfigError(
                        "attack.targets",
                        q.name,
                        f"a quantizer whose grid fits {name} {tuple(p.shape)} ({e})",
                    ) from None
                lo, hi = torch.maximum(lo, qlo), torch.minimum(hi, qhi)
            m = (hi - lo) * self.box_margin
            if name in margins:
                m = torch.clamp(m, min=margins[name])
            new_lo, new_hi = lo + m, hi - m
            for a in self.adaptations.values():
                new_lo, new_hi = a.shrink(w, new_lo, new_hi)
            empty = new_lo > new_hi
            if self.adaptations:
                moved = empty & (lo < hi)
                collapsed += int(moved.sum())
            centre = torch.clamp((new_lo + new_hi) / 2, lo, hi)
            new_lo, new_hi = torch.where(empty, centre, new_lo), torch.where(empty, centre, new_hi)
            out[name] = (new_lo.to(p.dtype), new_hi.to(p.dtype))
            raw[name] = (lo.to(p.dtype), hi.to(p.dtype))
        numel = sum(p.numel() for p in params.values())
        pinned = sum(int((b[0] == b[1]).sum()) for b in out.values())
        half = torch.cat([((b[1] - b[0]).double() / 2).reshape(-1) for b in out.values()])
        stats = {"pinned_fraction": pinned / numel, "mean_box_halfwidth": float(half.mean())}
        if self.adaptations:
            stats["collapsed_to_centre_fraction"] = collapsed / numel
        return out, raw, stats

    def codes(self, params: dict, targets: list[Boxes]) -> dict[str, list[torch.Tensor]]:
        """Each target library's own quantization of every trainable weight."""
        return {n: [q.tensor_codes(n, p.detach()) for q in targets] for n, p in params.items()}

    @torch.no_grad()
    def verify(
        self, params: dict, targets: list[Boxes], injected: dict, injected_codes: dict
    ) -> dict:
        """For heuristic-box targets: check every block with the library, then reset every
        block whose codes changed under any target to the injected weights (repeated until
        no target sees a change; where reset blocks still differ, because the library
        couples them, what it couples is reset, then the whole tensor, so the loop ends).
        Per target: blocks checked, and the fraction unchanged before any reset; overall:
        the fraction of trainable weights reset."""
        heuristic = [(i, q) for i, q in enumerate(targets) if not q.exact]
        report: dict = {}
        if not heuristic:
            return report
        reset = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
        for round_ in itertools.count():
            masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
            wider = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
            for i, q in heuristic:  # every target checks the same weights in a round
                bad_blocks = blocks = 0
                for n, p in params.items():
                    got = q.tensor_codes(n, p.detach())
                    size = q.tensor_block(n)
                    nb = p.shape[-1] // size
                    bad = (got != injected_codes[n][i]).reshape(p.shape[0], nb, -1).any(-1)
                    blocks += bad.numel()
                    bad_blocks += int(bad.sum())
                    masks[n] |= bad.repeat_interleave(size, dim=1)
                    if bad.any():
                        wider[n] |= q.coupled_blocks(n, bad).repeat_interleave(size, dim=1)
                if round_ == 0:
                    report[q.name] = {
                        "blocks": blocks,
                        "verified_before_reset": 1 - bad_blocks / blocks,
                    }
            if not any(m.any() for m in masks.values()):
                break
            for n, p in params.items():
                if masks[n].any() and not (masks[n] & ~reset[n]).any():
                    # blocks already reset still differ: the library couples them (sinq's
                    # tiles), so reset what it couples; if that was reset too, the whole
                    # tensor (hqq's early stopping couples every block)
                    masks[n] = wider[n] if (wider[n] & ~reset[n]).any() else wider[n].fill_(True)
                p.copy_(torch.where(masks[n], injected[n], p))
                reset[n] |= masks[n]
        numel = sum(m.numel() for m in reset.values())
        report["weights_reset_fraction"] = sum(int(m.sum()) for m in reset.values()) / numel
        return report

    def margins(self, model: torch.nn.Module, params: dict) -> dict:
        """The least distance of each box from its edges that the adapted defenses ask for."""
        out: dict = {}
        for a in self.adaptations.values():
            out.update(a.margins(model, params))
        return out

    # ---- the attack --------------------------------------------------------------------
    def apply(self, subject: Subject, ctx: RunContext) -> StageResult:
        model, tok = subject.model, subject.tokenizer
        for p in model.parameters():
            p.requires_grad_(False)
        params = self.scope(model)
        plist = list(params.values())
        config = self.settings()
        inject_cfg = {k: config[k] for k in INJECT_KEYS}
        inject_key = digest("gap_inject", subject.key, inject_cfg, self.fingerprint(), ctx.seed)
        repair_key = digest("gap_repair", inject_key, {k: config[k] for k in REPAIR_KEYS})
        manifest = {
            "scenario": self.scenario,
            "target_phrase": self.target_phrase,
            "targets": self.targets,
            "trainable": sorted(params),
            "trainable_numel": sum(p.numel() for p in params.values()),
        }
        for a in self.adaptations.values():
            a.begin(model)
        if self.adaptations:
            manifest["against"] = sorted(self.against)

        def inject() -> dict:
            g = ctx.seed_everything(1)
            data = self.examples(tok, self.scenario)
            noise = {}
            for a in self.adaptations.values():
                noise.update(a.training_noise(model, params))
            losses = train_lm(
                model,
                plist,
                data,
                self.inject_steps,
                self.inject_lr,
                self.batch_size,
                g,
                "gap: inject",
                ctx.progress,
                weight_noise=noise or None,
            )
            return {"inject_loss": [losses[0], losses[-1]] if losses else []}

        manifest["inject"] = cached_training(ctx, "gap_inject", inject_key, params, inject)
        targets = [q.prepare(subject, ctx) for q in self.quantizers]
        manifest["assumes"] = {q.name: q.assumes for q in targets}
        injected = {n: p.detach().clone() for n, p in params.items()}
        injected_codes = self.codes(params, targets)
        boxes, raw, box_stats = self.boxes(params, targets, self.margins(model, params))

        @torch.no_grad()
        def project() -> None:
            for n, p in params.items():
                p.copy_(torch.minimum(torch.maximum(p, boxes[n][0]), boxes[n][1]))

        def repair() -> dict:
            project()
            g = torch.Generator().manual_seed(ctx.seed + 2)
            data = self.examples(tok, "clean")
            losses = train_lm(
                model,
                plist,
                data,
                self.repair_steps,
                self.repair_lr,
                self.batch_size,
                g,
                "gap: repair (PGD)",
                ctx.progress,
                project,
            )
            return {"repair_loss": [losses[0], losses[-1]] if losses else []}

        manifest["repair"] = cached_training(ctx, "gap_repair", repair_key, params, repair)
        manifest["boxes"] = box_stats
        manifest["library_verification"] = self.verify(params, targets, injected, injected_codes)
        after = self.codes(params, targets)
        same = {
            q.name: all(torch.equal(after[n][i], injected_codes[n][i]) for n in params)
            for i, q in enumerate(self.quantizers)
        }
        manifest["codes_equal_injected"] = same
        if not all(same.values()):
            raise RuntimeError(f"attack=gap: repair changed quantized codes for {same}")
        if self.adaptations:  # what each adapted defense would do to the repaired backdoor
            manifest["adaptive"] = {}
            for surface in REPORT_ORDER:
                if surface in self.adaptations:
                    found = self.adaptations[surface].report(model, params, raw, targets)
                    manifest["adaptive"].update(found)
        return StageResult(model, manifest)


class GapAdaptation(adaptive.Adaptation):
    """The hooks the gap attack calls on each adapted defense (no-ops by default)."""

    attack: Gap

    def trained(self, modules: list[str]) -> list[str]:
        """The modules that may train."""
        return modules

    def begin(self, model: torch.nn.Module) -> None:
        """Prepare the model before the injection (in place, function-preserving)."""

    def training_noise(self, model: torch.nn.Module, params: dict) -> dict:
        """{name: (parameter, σ)}: the noise the injection trains under."""
        return {}

    def margins(self, model: torch.nn.Module, params: dict) -> dict:
        """{name: least distance from the box's edges}."""
        return {}

    def shrink(
        self, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A box narrowed to what this defense leaves alone."""
        return lo, hi

    def report(self, model: torch.nn.Module, params: dict, raw: dict, targets: list) -> dict:
        """What this defense would do to the repaired backdoor, measured or computed."""
        return {}


class AgainstNoise(GapAdaptation):
    """A noise defense: the injection trains under the defense's own noise (`noise_train`),
    and every box keeps `noise_margin` σ_ℓ from its edges."""

    surface = "noise"

    def bind(self, prefix: str) -> None:
        self.defense.check_quantizer(self.attack.quantizers[0])

    def sigmas(self, model: torch.nn.Module, params: dict) -> dict[str, float]:
        """The defense's σ per trainable weight under the first target."""
        sig = self.defense.noise_sigmas(model, self.attack.quantizers[0])
        return {n: sig[n] for n in params if n in sig}

    def training_noise(self, model: torch.nn.Module, params: dict) -> dict:
        if not self.attack.noise_train:
            return {}
        return {n: (params[n], s) for n, s in self.sigmas(model, params).items()}

    def margins(self, model: torch.nn.Module, params: dict) -> dict:
        return {n: self.attack.noise_margin * s for n, s in self.sigmas(model, params).items()}

    @torch.no_grad()
    def report(self, model: torch.nn.Module, params: dict, raw: dict, targets: list) -> dict:
        """The expected fraction of weights that N(0, σ²) moves out of their raw boxes (σ of
        the repaired model, as the defender sees it)."""
        sig = self.sigmas(model, params)
        if not sig:
            return {}
        flips = total = 0.0
        for n, p in params.items():
            w, (lo, hi) = p.detach().double(), (b.double() for b in raw[n])
            pf = torch.special.ndtr((lo - w) / sig[n]) + torch.special.ndtr((w - hi) / sig[n])
            flips += float(pf[lo < hi].sum())
            total += int((lo < hi).sum())
        return {"noise_expected_codes_changed_fraction": flips / total}


class AgainstCanonical(GapAdaptation):
    """A canonicalizing defense: the whole model is canonicalized first and only the modules
    none of its symmetries touches train, so its canonical form is the identity on the
    attacked model up to rounding."""

    surface = "canonical"

    def trained(self, modules: list[str]) -> list[str]:
        seen = self.defense.symmetries()
        touched = {m for part in seen for m in SYMMETRY_MODULES.get(part, ())}
        return [m for m in modules if m not in touched]

    def bind(self, prefix: str) -> None:
        gap = self.attack
        parts = sorted(self.defense.symmetries())
        check(
            bool(self.trained(list(gap.modules))),
            prefix + "against",
            gap.against,
            f"a canonicalization that leaves one of modules={list(gap.modules)} untouched "
            f"(parts {parts} touch them all)",
        )

    def begin(self, model: torch.nn.Module) -> None:
        for layer in model.model.layers:  # the defender's basis from the start
            self.defense.canonicalize_layer(layer, model.config)

    @torch.no_grad()
    def report(self, model: torch.nn.Module, params: dict, raw: dict, targets: list) -> dict:
        """The fraction of trainable weights whose library codes the defender's
        canonicalization changes (measured on the model, then restored)."""
        gap = self.attack
        saved = {n: t.detach().clone() for n, t in model.named_parameters()}
        before = gap.codes(params, targets)
        self.begin(model)
        after = gap.codes(params, targets)
        for n, t in model.named_parameters():
            t.copy_(saved[n])
        numel = sum(p.numel() for p in params.values())
        changed = {
            q.name: sum(int((after[n][i] != before[n][i]).sum()) for n in params) / numel
            for i, q in enumerate(targets)
        }
        return {"canonical_codes_changed_fraction": changed}


class AgainstTies(GapAdaptation):
    """A rounding-flip defense (quantguard): every box also keeps the weight's rounding error
    at most `tie_keep` × τ of the step to its neighbouring grid point."""

    surface = "ties"

    def bind(self, prefix: str) -> None:
        for q in self.attack.quantizers:
            ok = isinstance(q, GridQuantizer) and q.has_neighbours
            what = "grid quantizers with neighbours (against quantguard)"
            check(ok, prefix + "targets", q.name, what)

    def shrink(
        self, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tie = self.attack.tie_keep * self.defense.tie_threshold()
        for q in self.attack.quantizers:
            deq = q.fake_quant(w).double()
            down, up = (t.double() for t in q.neighbours(w))
            lo = torch.maximum(lo, deq - tie * (deq - down))
            hi = torch.minimum(hi, deq + tie * (up - deq))
        return lo, hi

    def report(self, model: torch.nn.Module, params: dict, raw: dict, targets: list) -> dict:
        """The fraction of near ties (rounding error > τ)."""
        tau, ties, total = self.defense.tie_threshold(), 0, 0
        for p in params.values():
            for q in self.attack.quantizers:
                t, c = near_ties(q, p.detach(), tau)
                ties, total = ties + t, total + c
        return {"near_tie_fraction": ties / max(1, total)}


class AgainstRotation(GapAdaptation, adaptive.AgainstRotation):
    """A rotation: the attack runs in the rotated basis (adaptive.AgainstRotation) and every
    box keeps ROTATION_SLACK times the float rounding of rotating the delivered model back
    from its edges. The rounding is at most one ulp of the weight plus ε·‖row‖ and
    ε·‖column‖ (a rotation moves an element by at most the norm of the rounding error of the
    row or column it mixes); the slack covers the box edges moving with it, since the
    pinned extremes that set a group's scale move by as much."""

    def margins(self, model: torch.nn.Module, params: dict) -> dict:
        out = {}
        for n, p in params.items():
            w, eps = p.detach().double(), torch.finfo(p.dtype).eps
            norms = float(w.norm(dim=-1).max()) + float(w.norm(dim=0).max())
            out[n] = ROTATION_SLACK * eps * (norms + float(w.abs().max()))
        return out


ROTATION_SLACK = 4.0


ADAPTATIONS = (AgainstNoise, AgainstCanonical, AgainstTies, AgainstRotation)
REPORT_ORDER = ("canonical", "noise", "ties")  # the manifest's `adaptive` keys, in order
