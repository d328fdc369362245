"""Attacks: each config in conf/attack/ builds one of these."""

from qexp.attacks.base import Attack, NoAttack

__all__ = ["Attack", "NoAttack"]
