"""models: one module per option (named by `_target_` in conf/model/), base.py holds the contract."""
