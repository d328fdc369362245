"""qexp: quantization-conditioned attacks and defenses on large language models."""

__version__ = "0.1.0"

CONDITIONS = ("original", "attacked", "original_q", "attacked_q")
