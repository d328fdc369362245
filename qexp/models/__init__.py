"""The model group: one module per option, named by `_target_` in conf/model/;
base.py holds the contract every option implements."""
