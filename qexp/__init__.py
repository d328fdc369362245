"""qexp: quantization-conditioned attacks and defenses on large language models."""

import logging as _logging

__version__ = "0.1.0"

CONDITIONS = ("original", "attacked", "original_q", "attacked_q")
__all__ = ["CONDITIONS", "load", "run"]


def __getattr__(name: str):
    """`qexp.run` and `qexp.load` (qexp/api.py), imported on first use: `import qexp` stays
    light (no torch) for the tools that do not run models."""
    if name in ("run", "load"):
        import importlib

        return getattr(importlib.import_module("qexp.api"), name)
    raise AttributeError(f"module 'qexp' has no attribute {name!r}")


# Third-party import-time chatter that says nothing about a qexp run: torchao (pulled in by
# transformers' integrations) failing to load CUDA-only kernels on a CPU machine, and torch's
# pytree deprecation notices for torchao's enums. Real errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
