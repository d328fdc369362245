"""The logger group: one module per option, named by `_target_` in conf/logger/;
base.py holds the contract every option implements."""
