"""The attack group: one module per option, named by `_target_` in conf/attack/;
base.py holds the contract every option implements."""
