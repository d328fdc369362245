"""A run's spec: its top-level settings and one validated plugin per config group.

`validate` checks everything before any model is loaded, in three phases: each plugin is
built from its YAML node (types, unknown keys, the plugin's own value checks; qexp/core/
registry.py), then every plugin resolves the options it names (`Plugin.resolve`: the gap
attack's targets, `attack.against`, launder's `via`), then each runs its cross-group checks
(`Plugin.check_spec`). Any failure is one ConfigError naming the key, the bad value and what
is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

from omegaconf import DictConfig, OmegaConf

from qexp import CONDITIONS
from qexp.benchmarks.similarity import SimilaritySettings
from qexp.core.cache import CACHE_MODES, normalize_mode
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.registry import GROUPS, build, build_plugin, options_where

if TYPE_CHECKING:
    from qexp.attacks.base import Attack
    from qexp.benchmarks.base import Benchmark
    from qexp.defenses.base import Defense
    from qexp.loggers.base import Logger
    from qexp.models.base import ModelSource
    from qexp.pruners.base import Pruner
    from qexp.quantizers.base import Quantizer

DTYPES = ("float32", "bfloat16", "float16")
CACHE_WEIGHT_STAGES = ("attack", "defend", "prune", "quantize")


@dataclass
class RunSchema:
    """Top-level scalars of a run."""

    seed: int = 0
    conditions: List[str] = field(default_factory=lambda: list(CONDITIONS))
    device: str = "auto"
    dtype: str = "float32"
    threads: Optional[int] = None
    cache_dir: str = "~/.cache/qexp"
    progress: bool = True
    save_quantized: bool = False
    save_attacked: bool = False
    cache: str = "on"
    cache_weights: List[str] = field(default_factory=lambda: ["attack", "quantize"])
    cache_code: bool = True
    similarity: SimilaritySettings = field(default_factory=SimilaritySettings)

    def __post_init__(self) -> None:
        check(len(self.conditions) > 0, "conditions", self.conditions, "a non-empty list")
        for c in self.conditions:
            check_choice("conditions", c, CONDITIONS)
        check(
            len(set(self.conditions)) == len(self.conditions),
            "conditions",
            self.conditions,
            "each condition at most once",
        )
        ok = self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device)
        check(bool(ok), "device", self.device, "auto, cpu, cuda or cuda:N (N a GPU index)")
        if self.device.startswith("cuda"):
            import torch

            n = torch.cuda.device_count()
            check(
                n > 0,
                "device",
                self.device,
                f"auto or cpu: this torch {torch.__version__} sees no CUDA GPU",
            )
            index = int(self.device.partition(":")[2] or 0)
            check(index < n, "device", self.device, f"cuda:0 .. cuda:{n - 1} ({n} GPUs seen)")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("cache", self.cache, CACHE_MODES)
        for s in self.cache_weights:
            check_choice("cache_weights", s, CACHE_WEIGHT_STAGES)
        check(
            self.threads is None or self.threads >= 1,
            "threads",
            self.threads,
            "null (all cores this process may use) or an integer >= 1",
        )


@dataclass
class Spec:
    """A validated run: top-level settings and one constructed plugin per group."""

    run: RunSchema
    model: ModelSource
    attack: Attack
    defense: Defense
    prune: Pruner
    quantizer: Quantizer
    benchmark: Benchmark
    logger: Logger

    def plugins(self) -> list:
        """The plugins, in GROUPS order."""
        return [getattr(self, g) for g in GROUPS]


def validate(cfg: DictConfig) -> Spec:
    """Validate a composed config and construct every plugin; no model is loaded here."""
    missing = [g for g in GROUPS if g not in cfg]
    if missing:
        raise ConfigError(missing[0], None, f"a config group choice ({missing[0]}=...)")
    top = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k not in GROUPS and k not in ("hydra", "experiment", "matrix")
    }
    if "matrix" in cfg:
        from qexp.pipeline.matrix import check_matrix

        check_matrix(cfg.matrix)
    if "cache" in top:
        top["cache"] = normalize_mode(top["cache"])
    run = build(RunSchema, top, "")
    run.similarity.check_installed()
    plugins = {g: build_plugin(g, cfg[g]) for g in GROUPS}
    spec = Spec(run=run, **plugins)
    if run.save_quantized and not spec.quantizer.saves_artifact:
        from qexp.quantizers.base import Quantizer

        native = options_where("quantizer", lambda c: issubclass(c, Quantizer) and c.saves_artifact)
        raise ConfigError(
            "save_quantized",
            True,
            f"false with quantizer={spec.quantizer.name} (native artifacts: {', '.join(native)})",
        )
    if run.save_attacked:
        check(
            not spec.attack.identity and bool({"attacked", "attacked_q"} & set(run.conditions)),
            "save_attacked",
            True,
            "true only with an attack (not attack=none) and an attacked or attacked_q condition",
        )
    for plugin in spec.plugins():  # the options a plugin names, built now: gap's targets, ...
        plugin.resolve(spec)
    for plugin in spec.plugins():  # its libraries installed (a quantizer's back-end, ...)
        plugin.validate_environment()
    for plugin in spec.plugins():  # checks across groups, e.g. a defense reading the quantizer
        plugin.check_spec(spec)
    return spec
