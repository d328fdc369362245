"""Loggers: each config in conf/logger/ builds one of these."""

from qexp.loggers.base import Logger
from qexp.loggers.wandb import WandbLogger

__all__ = ["Logger", "WandbLogger"]
