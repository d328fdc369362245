"""Benchmarks: each config in conf/benchmark/ builds one of these."""

from qexp.benchmarks.base import Benchmark, BenchResult, NoBenchmark
from qexp.benchmarks.svamp import SVAMP

__all__ = ["SVAMP", "BenchResult", "Benchmark", "NoBenchmark"]
