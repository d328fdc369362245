"""The one error type a user sees for bad configuration or input."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad config value: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not valid; allowed: {allowed}")

    def prefixed(self, prefix: str) -> ConfigError:
        """The same error with its key placed under `prefix` (e.g. the config group)."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`."""
    if not ok:
        raise ConfigError(key, value, allowed)


def check_choice(key: str, value: Any, choices: tuple | list) -> None:
    """Raise unless `value` is one of `choices`."""
    check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))
