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

One surface is attack-agnostic: against a rotation (`AgainstRotation`, every attack takes
it), the attacker rotates the model as the defense will, runs its own algorithm on the
rotated model, and delivers the result rotated back, so that the defender's rotation
returns the model the attack built (up to float rounding). With the defense's seed known
(`defense.seed` an integer) it uses that seed; with `defense.seed=null` the defender draws
one at defense time and the attacker can only draw its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any, ClassVar, Optional

from qexp.core.cache import digest
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check
from qexp.core.plugin import StageResult, Subject
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

    @property
    def plain_output(self) -> bool:
        """Against a rotation the delivered model has untied embeddings and fused norms."""
        return "rotation" not in getattr(self, "adaptations", {})

    def run(self, subject: Subject, ctx: RunContext) -> StageResult:
        """`apply`, in the rotated basis when adapting to a rotation."""
        rotation = getattr(self, "adaptations", {}).get("rotation")
        if rotation is None:
            return self.apply(subject, ctx)  # type: ignore[attr-defined]
        return rotation.wrap(subject, ctx, self.apply)  # type: ignore[attr-defined]


class AgainstRotation(Adaptation):
    """Attack the rotated model, deliver it rotated back (any attack)."""

    surface: ClassVar[str] = "rotation"

    def bind(self, prefix: str) -> None:
        check(
            not self.defense.online,
            prefix + "against",
            self.defense.name,
            "a rotate defense whose rotations are all fused (method=spinquant, rotations a "
            "subset of [R1, R2]): qexp does not yet deliver a model against online rotations",
        )

    def attacker_seed(self, subject: Subject, ctx: RunContext) -> int:
        """The defense's seed when it is fixed (known to the attacker), else the attacker's
        own draw (the defender's is drawn at defense time from what the attacker lacks)."""
        seed = self.defense.seed
        return seed if seed is not None else int(digest("attacker", ctx.seed, subject.key)[:8], 16)

    def wrap(self, subject: Subject, ctx: RunContext, apply: Any) -> StageResult:
        seed = self.attacker_seed(subject, ctx)
        self.defense.rotate_model(subject.model, seed)
        # the rotated model is another model state: its own key, so the attack's cached
        # sub-steps (keyed from it) never load weights trained in the unrotated basis
        rotated = replace(subject, key=digest("rotated", subject.key, seed, self.settings()))
        out = apply(rotated, ctx)
        self.defense.unrotate_model(out.model, seed)
        known = self.defense.seed is not None
        record = {"seed": seed, "defense_seed": "known" if known else "drawn at defense time"}
        return StageResult(out.model, {**out.info, "rotation": record}, out.files)


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
