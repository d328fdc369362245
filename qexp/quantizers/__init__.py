"""quantizers: one module per option (named by `_target_` in conf/quantizer/), base.py holds the contract."""
