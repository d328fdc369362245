"""Config groups and their options: where the YAML lives, how Hydra composes an option, and
how its plugin class is found and constructed (errors name the key, the value and what is
allowed). This is the one module that uses Hydra's internals.

Plugins are dataclasses named by `_target_` in their group's YAML (conf/<group>/<name>.yaml,
shared parts in conf/<group>/base/). `build` merges a YAML node into the dataclass schema
(type check, unknown keys) and constructs it, which runs the plugin's own value checks
(`__post_init__`); cross-plugin references are resolved later (`Plugin.resolve`).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, List

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

import qexp
from qexp.core.errors import ConfigError, check, check_choice

GROUPS = ("model", "attack", "defense", "prune", "quantizer", "benchmark", "logger")


def _conf_dir() -> Path:
    """The config tree: inside the package in a wheel (the build maps the top-level conf/
    there), the repository's conf/ in a source checkout or an editable install."""
    package = Path(qexp.__file__).resolve().parent
    inside = package / "conf"
    return inside if (inside / "config.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def config_fields(cls: type) -> dict[str, Any]:
    """The config keys of dataclass `cls` and their types (derived fields, `init=False`,
    are not keys: `Plugin.resolve` sets them)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build(cls: type, values: dict, prefix: str) -> Any:
    """Type-check `values` against dataclass `cls` and construct it; errors name `prefix.key`."""
    types = config_fields(cls)
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
        allowed = f"a {group} config with a _target_ (see conf/{group}/)"
        raise ConfigError(group, values, allowed)
    values = dict(values)
    target = values.pop("_target_")
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"{group}._target_", target, "an importable qexp plugin class") from None
    check(dataclasses.is_dataclass(cls), f"{group}._target_", target, "a dataclass plugin")
    return build(cls, values, group)


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


def parse_args(argv: list[str]) -> Any:
    """Hydra's own command-line parser on `argv` (its flags and the overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_known_args(argv)[0]


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


def build_option(group: str, name: str, key: str, changes: dict | None = None) -> Any:
    """Construct group option `name` (conf/<group>/<name>.yaml as Hydra composes it, with
    `changes` to its keys); errors name `key`."""
    check_choice(key, name, options(group))
    plugin = build_plugin(group, {**option_node(group, name), **(changes or {})})
    plugin.resolve(None)  # the options it names in turn, on their own (no run around it)
    return plugin


def run_job(task: Callable[[DictConfig], Any], overrides: list[str]) -> Any:
    """Run `task` as the `qexp` app's one Hydra job, in this process: the same config
    composition, run directory (`hydra.run.dir`), `.hydra/` files and job logging as the
    command line; returns what `task` returned (and raises what it raised)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        raise RuntimeError(
            "Hydra is already initialized in this process (inside a Hydra app or an "
            "initialize() block): call qexp.run outside it"
        )
    hydra = Hydra.create_main_hydra2("qexp", create_config_search_path(str(CONF_DIR)))
    try:
        return hydra.run("config", task, overrides).return_value
    finally:
        GlobalHydra.instance().clear()
