"""Defenses: each config in conf/defense/ builds one of these."""

from qexp.defenses.base import Defense, NoDefense
from qexp.defenses.canonicalize import Canonicalize
from qexp.defenses.clip import Clip
from qexp.defenses.finetune import Finetune
from qexp.defenses.launder import Launder
from qexp.defenses.noise import Noise
from qexp.defenses.quantguard import QuantGuard

__all__ = [
    "Canonicalize",
    "Clip",
    "Defense",
    "Finetune",
    "Launder",
    "NoDefense",
    "Noise",
    "QuantGuard",
]
