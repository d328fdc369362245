"""benchmarks: one module per option (named by `_target_` in conf/benchmark/), base.py holds the contract."""
