"""loggers: one module per option (named by `_target_` in conf/logger/), base.py holds the contract."""
