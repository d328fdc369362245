"""`attack.against`: the defenses an adaptive attack is built to survive.

Each entry names a defense option: the run's own defense when it is that option (the
attacker knows the defender's settings, e.g. `defense.sigma=global`), otherwise
conf/defense/<name>.yaml as Hydra composes it. What an attack reads of it is the defense's
declared `surface` (qexp/defenses/base.py): its noise σ per weight, its canonical form, its
near-tie threshold or its outlier rule.

An attack adapts through one `Adaptation` object per surface: it declares which surfaces it
adapts to (a subclass of its own `Adaptation` per surface, whose hooks it calls at fixed
points of its algorithm), and any other defense is a config error naming the options it
does adapt to. The objects are built once, by `Plugin.resolve`, after every plugin of the
run exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Optional

from qexp.core.errors import ConfigError, check
from qexp.core.registry import build_option, option_class, options, options_where
from qexp.defenses.base import Defense


class Adaptation:
    """How an attack adapts to one defense surface; subclasses add the attack's hooks."""

    surface: ClassVar[str]

    def __init__(self, defense: Defense, attack: Any) -> None:
        self.defense, self.attack = defense, attack

    def bind(self, prefix: str) -> None:
        """Fit the attack to this defense: narrow what it does (into its derived fields), and
        refuse a config that cannot work against it (ConfigError naming `prefix`key)."""

    def settings(self) -> dict:
        """The adapted defense's settings (part of the attack's stage-cache key)."""
        return self.defense.settings()


class Adapts:
    """Mixin of an attack with `attack.against`: its `adaptations` (a derived field set by
    `resolve`), and the defenses they adapt to, by surface."""

    adaptations: dict[str, Adaptation]

    @property
    def adapted(self) -> dict[str, Defense]:
        """The adapted defenses by surface."""
        return {s: a.defense for s, a in self.adaptations.items()}


def resolve(
    names: Iterable[str],
    kinds: Iterable[type[Adaptation]],
    attack: Any,
    run: Optional[Defense],
    key: str,
) -> dict[str, Adaptation]:
    """{surface: adaptation} for the defense options `names`, one per surface, each of the
    `kinds` this attack implements (`run`: the run's defense, used where it is the named
    option; None outside a run); errors name `key`."""
    by_surface = {k.surface: k for k in kinds}
    usable = options_where("defense", lambda c: getattr(c, "surface", None) in by_surface)
    what = f"defenses attack={attack.name} adapts to: " + ", ".join(usable)
    out: dict[str, Adaptation] = {}
    for name in names:
        if name not in options("defense"):
            raise ConfigError(key, name, what)
        cls = option_class("defense", name, key)
        check(cls.surface in by_surface, key, name, what)
        check(cls.surface not in out, key, name, f"one defense per kind ({cls.surface})")
        same = run is not None and run.name == name
        defense = run if same else build_option("defense", name, key)
        out[cls.surface] = by_surface[cls.surface](defense, attack)
    prefix = key.rpartition(".")[0] + "." if "." in key else ""
    for adaptation in out.values():
        adaptation.bind(prefix)
    return out


def fingerprint(adapted: dict[str, Adaptation]) -> dict:
    """The adapted defenses' settings by surface (part of the attack's stage-cache key)."""
    return {s: a.settings() for s, a in sorted(adapted.items())}
