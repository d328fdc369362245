"""Config validation: every group and key is checked before any model is loaded.

Plugins are dataclasses named by `_target_` in their group's YAML (qexp/conf/<group>/).
Validation merges the YAML node into the dataclass schema (type check, unknown keys), then
constructs it, which runs the plugin's own value checks (`__post_init__`), then each
plugin's cross-group `check_spec`. Any failure becomes one ConfigError naming the key, the
bad value and what is allowed. `build_option` builds a group option by name (e.g. the gap
attack's targets, the launder defense's `via`), composed by Hydra like the app does.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from qexp import CONDITIONS
from qexp.cache import CACHE_MODES, normalize_mode
from qexp.errors import ConfigError, check, check_choice
from qexp.similarity import SimilaritySettings

if TYPE_CHECKING:
    from qexp.attacks.base import Attack
    from qexp.benchmarks.base import Benchmark
    from qexp.defenses.base import Defense
    from qexp.loggers.base import Logger
    from qexp.models.base import ModelSource
    from qexp.quantizers.base import Quantizer

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("model", "attack", "defense", "quantizer", "benchmark", "logger")
DTYPES = ("float32", "bfloat16", "float16")
CACHE_WEIGHT_STAGES = ("attack", "defend", "quantize")


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
    quantizer: Quantizer
    benchmark: Benchmark
    logger: Logger

    def plugins(self) -> list:
        """The six plugins, in GROUPS order."""
        return [getattr(self, g) for g in GROUPS]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build(cls: type, values: dict, prefix: str) -> Any:
    """Type-check `values` against dataclass `cls` and construct it; errors name `prefix.key`."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}" if prefix else unknown[0],
            values[unknown[0]],
            "known keys: " + ", ".join(sorted(types)),
        )
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(node)
    except ConfigError as e:
        raise e.prefixed(prefix) from None
    except ConfigKeyError as e:  # pragma: no cover - unknown keys are caught above
        raise ConfigError(f"{prefix}.{e.key}", None, "known keys: " + ", ".join(types)) from None
    except OmegaConfBaseException as e:
        key = str(e.full_key or e.key).split(".")[0].split("[")[0]
        value = values.get(key, "???")
        where = f"{prefix}.{key}" if prefix else key
        if value == "???":
            raise ConfigError(where, value, "a value: this key is required") from None
        raise ConfigError(where, value, _type_name(types.get(key, Any))) from None


def build_plugin(group: str, node: Any) -> Any:
    """Construct the plugin of one config group from its YAML node."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(values, dict) or "_target_" not in values:
        allowed = f"a {group} config with a _target_ (see qexp/conf/{group}/)"
        raise ConfigError(group, values, allowed)
    target = values.pop("_target_")
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"{group}._target_", target, "an importable qexp plugin class") from None
    check(dataclasses.is_dataclass(cls), f"{group}._target_", target, "a dataclass plugin")
    return build(cls, values, group)


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
        from qexp.matrix import check_matrix

        check_matrix(cfg.matrix)
    if "cache" in top:
        top["cache"] = normalize_mode(top["cache"])
    run = build(RunSchema, top, "")
    run.similarity.check_installed()
    plugins = {g: build_plugin(g, cfg[g]) for g in GROUPS}
    spec = Spec(run=run, **plugins)
    if run.save_quantized:
        check(
            spec.quantizer.saves_artifact,
            "save_quantized",
            True,
            "false with quantizer="
            + spec.quantizer.name
            + " (native artifacts: GPTQModel, llm-compressor, bitsandbytes, llama.cpp quantizers)",
        )
    if run.save_attacked:
        check(
            not spec.attack.identity and bool({"attacked", "attacked_q"} & set(run.conditions)),
            "save_attacked",
            True,
            "true only with an attack (not attack=none) and an attacked or attacked_q condition",
        )
    for plugin in spec.plugins():  # checks across groups, e.g. a defense reading the quantizer
        plugin.check_spec(spec)
    return spec


def options(group: str) -> list[str]:
    """The selectable options of a config group (its YAML files; base/ holds shared parts)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _loader():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    # Hydra's own loader over qexp's config dir, without touching the global Hydra state of
    # a running app (hydra.compose would need it, and a different search path breaks it)
    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))


def compose_overrides(overrides: list[str]) -> DictConfig:
    """The app's config with command-line `overrides` (no sweeps), as Hydra composes it; an
    unknown group option or key is a ConfigError listing what is allowed."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from hydra.types import RunMode

    for o in overrides:
        group, _, value = o.partition("=")
        unset = group == "experiment" and value in ("null", "None")
        if group in (*GROUPS, "experiment") and not unset:
            check_choice(group, value, options(group))
    try:
        return _loader().load_configuration("config", overrides=overrides, run_mode=RunMode.RUN)
    except (ConfigCompositionException, MissingConfigException) as e:
        key = next(
            (o.partition("=")[0] for o in overrides if f"'{o.partition('=')[0]}'" in str(e)), None
        )
        if key is None:
            raise
        value = next(o.partition("=")[2] for o in overrides if o.startswith(key + "="))
        raise ConfigError(key, value, _known_keys(key, overrides)) from None


def _known_keys(key: str, overrides: list[str]) -> str:
    """What may stand at `key`'s place: the keys of its parent node (with the group options
    the command line chose), or how to add a new key."""
    from hydra.types import RunMode

    parent = key.rpartition(".")[0]
    groups = [o for o in overrides if o.partition("=")[0] in (*GROUPS, "experiment")]
    cfg = _loader().load_configuration("config", overrides=groups, run_mode=RunMode.RUN)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not OmegaConf.is_dict(node):
        return f"a key that exists (use +{key}=... to add one)"
    keys = ", ".join(sorted(str(k) for k in node if k != "hydra"))
    where = f"{parent}" if parent else "the top level"
    return f"a key of {where}: {keys} (a new key needs +{key}=...)"


def option_node(group: str, name: str) -> dict:
    """Group option `name` as Hydra composes it (a fresh dict, `_target_` included)."""
    return copy.deepcopy(_composed(group, name))


@lru_cache(maxsize=64)
def _composed(group: str, name: str) -> dict:
    from hydra.types import RunMode

    overrides = [f"{group}={name}"]
    cfg = _loader().load_configuration("config", overrides=overrides, run_mode=RunMode.RUN)
    return OmegaConf.to_container(cfg[group], resolve=True)


def option_class(group: str, name: str, key: str) -> type:
    """The plugin class of group option `name`, without constructing it."""
    check_choice(key, name, options(group))
    target = _composed(group, name).get("_target_")
    return get_class(target)


def options_where(group: str, accept: Callable[[type], bool]) -> list[str]:
    """The options of `group` whose plugin class `accept`s (e.g. grid quantizers)."""
    return [n for n in options(group) if accept(option_class(group, n, group))]


def build_option(group: str, name: str, key: str) -> Any:
    """Construct group option `name` (qexp/conf/<group>/<name>.yaml as Hydra composes it);
    errors name `key`."""
    check_choice(key, name, options(group))
    return build_plugin(group, option_node(group, name))
