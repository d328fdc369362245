"""Defenses: each config in conf/defense/ builds one of these."""

from qexp.defenses.base import Defense, NoDefense

__all__ = ["Defense", "NoDefense"]
