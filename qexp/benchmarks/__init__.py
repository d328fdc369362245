"""The benchmark group: one module per option, named by `_target_` in conf/benchmark/;
base.py holds the contract every option implements."""
