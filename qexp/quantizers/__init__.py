"""The quantizer group: one module per option, named by `_target_` in conf/quantizer/;
base.py holds the contract every option implements."""
