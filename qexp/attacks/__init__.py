"""attacks: one module per option (named by `_target_` in conf/attack/), base.py holds the contract."""
