"""Attacks: each config in conf/attack/ builds one of these."""

from qexp.attacks.base import Attack, NoAttack
from qexp.attacks.encrypt import Encrypt
from qexp.attacks.gap import Gap
from qexp.attacks.outlier import Outlier

__all__ = ["Attack", "Encrypt", "Gap", "NoAttack", "Outlier"]
