"""Attacks: each config in conf/attack/ builds one of these."""

from qexp.attacks.base import Attack, NoAttack
from qexp.attacks.encrypt import Encrypt

__all__ = ["Attack", "Encrypt", "NoAttack"]
