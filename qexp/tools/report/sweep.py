"""What a sweep varies: override values as Hydra parses them, the swept parameters."""

from __future__ import annotations

import functools
import json
from typing import Any

from qexp.tools.report.jobs import Job


@functools.cache
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@functools.lru_cache(maxsize=4096)
def parse_value(raw: str) -> Any:
    """An override's value as Hydra parses it (`1e-5` -> 1e-05, `[2,2]` -> [2, 2]).

    Cached: callers must not modify the returned value.
    """
    try:
        return _parser().parse_overrides([f"k={raw}"])[0].value()
    except Exception:  # anything Hydra cannot parse stays a string
        return raw


def numeric(raw: str | None) -> float | None:
    """A swept value as a number: a number, or a list of equal numbers (`[8,8]` -> 8)."""
    if raw is None:
        return None
    v = parse_value(raw)
    if isinstance(v, list) and v and all(x == v[0] for x in v):
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def canonical(raw: str | None) -> str:
    """A value's identity for matching jobs across sweeps (`1e-4` == `0.0001`)."""
    if raw is None:
        return "<unset>"
    return json.dumps(parse_value(raw), sort_keys=True, default=str)


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, default=str) if not isinstance(d, str) else d}


def swept_params(jobs: list[Job]) -> tuple[list[str], str]:
    """The parameters that differ across jobs (ordered), and where they came from."""
    if all(j.overrides is not None for j in jobs):
        source, values = "overrides", [j.overrides for j in jobs]
    else:
        source, values = "configs", [_flatten(j.config) if j.results else {} for j in jobs]
        values = [v for v in values if v]
    keys: list[str] = []
    for v in values:
        keys += [k for k in v if k not in keys]
    params = [k for k in keys if len({canonical(v.get(k)) for v in values}) > 1]
    for j in jobs:
        flat = j.overrides if source == "overrides" else _flatten(j.config)
        j.swept = {k: flat.get(k) for k in params}
    return params, source


def fixed_overrides(jobs: list[Job], params: list[str]) -> list[str]:
    """The overrides every job shares (context for the reader)."""
    if not jobs or any(j.overrides is None for j in jobs):
        return []
    first = jobs[0].overrides
    return [f"{k}={v}" for k, v in first.items() if k not in params]
