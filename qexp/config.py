"""Config validation: every group and key is checked before any model is loaded.

Plugins are dataclasses named by `_target_` in their group's YAML. Validation merges the
YAML node into the dataclass schema (type check, unknown keys), then constructs it, which
runs the plugin's own value checks (`__post_init__`). Any failure becomes one ConfigError
naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from qexp import CONDITIONS
from qexp.cache import CACHE_MODES, normalize_mode
from qexp.errors import ConfigError, check, check_choice
from qexp.similarity import SimilaritySettings

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
        ok = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        check(ok, "device", self.device, "auto, cpu, cuda or cuda:N")
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
    model: Any
    attack: Any
    defense: Any
    quantizer: Any
    benchmark: Any
    logger: Any


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
        raise ConfigError(group, values, f"a {group} config with a _target_ (see conf/{group}/)")
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
        if k not in GROUPS and k not in ("hydra", "experiment")
    }
    if "cache" in top:
        top["cache"] = normalize_mode(top["cache"])
    run = build(RunSchema, top, "")
    plugins = {g: build_plugin(g, cfg[g]) for g in GROUPS}
    spec = Spec(run=run, **plugins)
    if run.save_quantized:
        check(
            getattr(spec.quantizer, "saves_artifact", False),
            "save_quantized",
            True,
            "false with quantizer="
            + spec.quantizer.name
            + " (native artifacts: GPTQModel, llm-compressor and bitsandbytes quantizers)",
        )
    for g in GROUPS:  # checks that involve other groups, e.g. a defense reading the quantizer
        hook = getattr(plugins[g], "check_spec", None)
        if hook is not None:
            hook(spec)
    return spec
