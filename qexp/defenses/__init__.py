"""The defense group: one module per option, named by `_target_` in conf/defense/;
base.py holds the contract every option implements."""
