"""Judges of model outputs: keywords (refusal, target phrase), the semantic refusal judge and
bandit's insecure-code judge."""
