"""Benchmarks: each config in conf/benchmark/ builds one of these."""

from qexp.benchmarks.aime import AIME24
from qexp.benchmarks.base import Benchmark, BenchResult, NoBenchmark
from qexp.benchmarks.harness import LMEval
from qexp.benchmarks.humaneval import HumanEval
from qexp.benchmarks.instruct import Instruct
from qexp.benchmarks.ppl import Perplexity
from qexp.benchmarks.svamp import SVAMP

__all__ = [
    "HumanEval",
    "Instruct",
    "LMEval",
    "AIME24",
    "SVAMP",
    "Perplexity",
    "BenchResult",
    "Benchmark",
    "NoBenchmark",
]
