"""`attack.against`: the defenses an adaptive attack is built to survive.

Each entry names a defense option: the run's own defense when it is that option (the
attacker knows the defender's settings, e.g. `defense.sigma=global`), otherwise
qexp/conf/defense/<name>.yaml as Hydra composes it.
What an attack reads of it is the defense's declared `surface` (qexp/defenses/base.py):
its noise σ per weight, its canonical form, its near-tie threshold or its outlier rule.
An attack lists the surfaces it adapts to; any other defense is a config error naming the
options it does adapt to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Optional

from qexp.defenses.base import Defense
from qexp.errors import ConfigError, check


def against_defenses(
    names: Iterable[str],
    surfaces: Iterable[str],
    attack: str,
    run: Optional[Defense] = None,
    key: str = "against",
) -> dict[str, Defense]:
    """{surface: the constructed defense} for `names` (`run`: the run's defense, used where
    it is the named option); one defense per surface; errors name `key`."""
    from qexp.config import build_option, option_class, options, options_where

    allowed = tuple(surfaces)
    usable = options_where("defense", lambda c: getattr(c, "surface", None) in allowed)
    what = f"defenses attack={attack} adapts to: " + ", ".join(usable)
    out: dict[str, Defense] = {}
    for name in names:
        if name not in options("defense"):
            raise ConfigError(key, name, what)
        cls = option_class("defense", name, key)
        check(cls.surface in allowed, key, name, what)
        check(cls.surface not in out, key, name, f"one defense per kind ({cls.surface})")
        same = run is not None and run.name == name
        out[cls.surface] = run if same else build_option("defense", name, key)
    return out


def fingerprint(defenses: dict[str, Defense]) -> dict:
    """The adapted defenses' settings (part of the attack's stage-cache key)."""
    return {s: dataclasses.asdict(d) for s, d in sorted(defenses.items())}
