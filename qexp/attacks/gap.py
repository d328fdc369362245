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
   checked with each library's own codes (`quantizer.codes`) and a failure stops the run.

Only linear weights of the chosen decoder layers train (the quantized ones); everything else
stays frozen. The injected and repaired weights are cached under
`cache_dir/attacks/gap-<hash>.safetensors`, keyed by the attack config, the seed, the data
and the starting weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qexp.attacks.base import Attack
from qexp.context import RunContext
from qexp.errors import ConfigError, check, check_choice
from qexp.instruct import SCENARIOS, encode, load_rows, train_lm
from qexp.io import atomic_open

CACHE_VERSION = 2
CONF_QUANTIZERS = Path(__file__).resolve().parents[2] / "conf" / "quantizer"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def grid_quantizer(name: str, key: str):
    """Build conf/quantizer/<name>.yaml; it must have a deterministic grid (intervals)."""
    from qexp.config import build_plugin
    from qexp.quantizers.base import GridQuantizer

    grids = sorted(
        p.stem
        for p in CONF_QUANTIZERS.glob("*.yaml")
        if "GPTQModel" not in p.read_text() and p.stem != "none"
    )
    check(name in grids, key, name, "grid quantizers: " + ", ".join(grids))
    q = build_plugin("quantizer", OmegaConf.load(CONF_QUANTIZERS / f"{name}.yaml"))
    check(isinstance(q, GridQuantizer), key, name, "grid quantizers: " + ", ".join(grids))
    return q


def trainable_weights(
    model: PreTrainedModel, layers: list[int], last_layers: int, modules: list[str], group: str
) -> dict[str, torch.nn.Parameter]:
    """Linear weights named in `modules` of decoder `layers` ([] = the last `last_layers`)."""
    n = model.config.num_hidden_layers
    chosen = list(layers) or list(range(max(0, n - last_layers), n))
    for i in chosen:
        check(0 <= i < n, f"{group}.layers", list(layers), f"layer indices in 0..{n - 1}")
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if (
            name.endswith(".weight")
            and "layers" in parts
            and int(parts[parts.index("layers") + 1]) in chosen
            and parts[-2] in modules
        ):
            out[name] = p
    if not out:
        raise ConfigError(f"{group}.modules", list(modules), f"linear names in {MODULES}")
    return out


@dataclass
class Gap(Attack):
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
    cache: bool = True
    preserves_function = False

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIOS)
        check(bool(self.target_phrase), "target_phrase", self.target_phrase, "a non-empty string")
        check(len(self.targets) > 0, "targets", self.targets, "a non-empty list of quantizers")
        self.quantizers = [grid_quantizer(t, "attack.targets") for t in self.targets]
        check(self.last_layers >= 1, "last_layers", self.last_layers, "an integer >= 1")
        for m in self.modules:
            check_choice("modules", m, MODULES)
        for k in ("inject_steps", "repair_steps"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "an integer >= 0")
        for k in ("inject_lr", "repair_lr"):
            check(getattr(self, k) > 0, k, getattr(self, k), "a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(0 <= self.box_margin < 0.5, "box_margin", self.box_margin, "a fraction in [0, 0.5)")
        if self.data_path is not None:
            check(
                Path(self.data_path).expanduser().is_file(),
                "data_path",
                self.data_path,
                "an existing JSONL file (fields: instruction, clean, " + ", ".join(SCENARIOS) + ")",
            )
        self.last_manifest: dict = {}

    # ---- scope -------------------------------------------------------------------------
    def scope(self, model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
        """The trainable linear weights, by parameter name."""
        return trainable_weights(model, self.layers, self.last_layers, self.modules, "attack")

    # ---- data --------------------------------------------------------------------------
    def examples(self, tok: PreTrainedTokenizerBase, response: str) -> list[tuple[list, int]]:
        """(token ids, prompt length) per training row, for `response` = a scenario or clean."""
        rows = load_rows(self.data_path, "train", "attack.data_path")
        return encode(tok, rows, response, self.target_phrase)

    # ---- boxes -------------------------------------------------------------------------
    def boxes(self, params: dict[str, torch.nn.Parameter]) -> tuple[dict, dict]:
        """Intersection of the targets' preserving intervals, shrunk by `box_margin`.

        A weight lying exactly on a rounding boundary (a tie, which each library breaks its
        own way) may sit at the edge of the neighbouring code's interval; such weights are
        found by checking the library's code at each box's centre and are pinned.
        """
        out, ties = {}, 0
        for name, p in params.items():
            w = p.detach()
            lo = torch.full(p.shape, -torch.inf, dtype=torch.float64)
            hi = torch.full(p.shape, torch.inf, dtype=torch.float64)
            for q in self.quantizers:
                try:
                    qlo, qhi = q.intervals(w)
                except ValueError as e:
                    raise ConfigError(
                        "attack.targets",
                        q.name,
                        f"a quantizer whose grid fits {name} {tuple(p.shape)} ({e})",
                    ) from None
                centre = torch.where(qlo < qhi, (qlo + qhi) / 2, w.double()).to(w.dtype)
                tie = q.fake_quant(centre) != q.fake_quant(w)
                ties += int(tie.sum())
                qlo = torch.where(tie, w.double(), qlo)
                qhi = torch.where(tie, w.double(), qhi)
                lo, hi = torch.maximum(lo, qlo), torch.minimum(hi, qhi)
            m = (hi - lo) * self.box_margin
            out[name] = ((lo + m).to(p.dtype), (hi - m).to(p.dtype))
        numel = sum(p.numel() for p in params.values())
        pinned = sum(int((b[0] == b[1]).sum()) for b in out.values())
        half = torch.cat([((b[1] - b[0]).double() / 2).reshape(-1) for b in out.values()])
        return out, {
            "pinned_fraction": pinned / numel,
            "ties_pinned": ties,
            "mean_box_halfwidth": float(half.mean()),
        }

    def codes(self, params: dict[str, torch.nn.Parameter]) -> dict[str, list[torch.Tensor]]:
        """Each target library's own quantization of every trainable weight."""
        return {n: [q.codes(p.detach()) for q in self.quantizers] for n, p in params.items()}

    # ---- cache -------------------------------------------------------------------------
    def cache_keys(self, params: dict[str, torch.nn.Parameter], seed: int) -> tuple[str, str]:
        """Content hashes of the injected model and of the repaired one."""
        h = hashlib.sha256()
        inject_cfg = {
            k: getattr(self, k)
            for k in (
                "scenario",
                "target_phrase",
                "layers",
                "last_layers",
                "modules",
                "inject_steps",
                "inject_lr",
                "batch_size",
            )
        }
        h.update(
            json.dumps(
                {"v": CACHE_VERSION, "inject": inject_cfg, "seed": seed}, sort_keys=True
            ).encode()
        )
        rows = load_rows(self.data_path, "train", "attack.data_path")
        h.update(json.dumps(rows, sort_keys=True).encode())
        for n in sorted(params):
            h.update(n.encode())
            h.update(params[n].detach().float().numpy().tobytes())
        inject_key = h.hexdigest()[:20]
        repair_cfg = {
            k: getattr(self, k) for k in ("targets", "box_margin", "repair_steps", "repair_lr")
        }
        h.update(json.dumps({"repair": repair_cfg}, sort_keys=True).encode())
        return inject_key, h.hexdigest()[:20]

    # ---- the attack --------------------------------------------------------------------
    @torch.no_grad()
    def _set(self, params: dict, tensors: dict) -> None:
        for n, p in params.items():
            p.copy_(tensors[n])

    def _stage(self, path: Path, params: dict, train, ctx: RunContext) -> dict:
        """Load a stage's weights from the cache, or train them and store them."""
        # top-level cache=off disables this cache too; cache=refresh retrains and overwrites
        if self.cache and ctx.cache == "on" and path.is_file():
            self._set(params, load_file(str(path)))
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            return {**meta, "cached": True}
        for p in params.values():
            p.requires_grad_(True)
        meta = train()
        for p in params.values():
            p.requires_grad_(False)
        if self.cache and ctx.cache != "off":
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                f.write(_safetensors_bytes({n: p.detach() for n, p in params.items()}))
            with atomic_open(path.with_suffix(".json"), "w") as f:
                json.dump(meta, f, sort_keys=True)
        return {**meta, "cached": False}

    def apply(self, model: PreTrainedModel, ctx: RunContext) -> PreTrainedModel:
        tok = ctx.tokenizer
        if tok is None:
            raise ValueError("attack=gap needs the run's tokenizer (ctx.tokenizer)")
        for p in model.parameters():
            p.requires_grad_(False)
        params = self.scope(model)
        plist = list(params.values())
        inject_key, repair_key = self.cache_keys(params, ctx.seed)
        root = ctx.cache_dir / "attacks"
        manifest = {
            "scenario": self.scenario,
            "target_phrase": self.target_phrase,
            "targets": self.targets,
            "trainable": sorted(params),
            "trainable_numel": sum(p.numel() for p in params.values()),
        }

        def inject() -> dict:
            g = ctx.seed_everything(1)
            data = self.examples(tok, self.scenario)
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
            )
            return {"inject_loss": [losses[0], losses[-1]] if losses else []}

        manifest["inject"] = self._stage(
            root / f"gap-inject-{inject_key}.safetensors", params, inject, ctx
        )
        injected_codes = self.codes(params)
        boxes, box_stats = self.boxes(params)

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

        manifest["repair"] = self._stage(
            root / f"gap-repair-{repair_key}.safetensors", params, repair, ctx
        )
        manifest["boxes"] = box_stats
        after = self.codes(params)
        same = {
            q.name: all(torch.equal(after[n][i], injected_codes[n][i]) for n in params)
            for i, q in enumerate(self.quantizers)
        }
        manifest["codes_equal_injected"] = same
        self.last_manifest = manifest
        if not all(same.values()):
            raise RuntimeError(f"attack=gap: repair changed quantized codes for {same}")
        return model


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})
