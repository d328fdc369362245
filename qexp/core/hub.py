"""The Hugging Face hub, for every config key that may name something on it.

`require_hub_model` is checked at validation, before any model loads: a hub id must be in
the local cache or the hub must answer; otherwise one ConfigError names the key, the id and
how to fix it. `hub_dataset` loads a dataset split, with the same kind of error.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

from qexp.core.errors import ConfigError

PROBE_TIMEOUT_S = 5.0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def cached(repo_id: str, filename: str = "config.json", revision: Optional[str] = None) -> bool:
    """Whether `filename` of hub repo `repo_id` is in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, revision=revision)
    return isinstance(hit, str)


@lru_cache(maxsize=16)
def hub_unreachable(repo_id: str) -> Optional[str]:
    """None when the hub answers for `repo_id` (within a few seconds), else why not."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(repo_id, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # no network, DNS, 404, auth: all mean "cannot load it from here"
        return _first_line(e)
    return None


def require_hub_model(key: str, repo_id: str, revision: Optional[str] = None) -> None:
    """Raise ConfigError unless hub model `repo_id` is cached locally or the hub answers."""
    if cached(repo_id, "config.json", revision):
        return
    why = hub_unreachable(repo_id)
    if why is None:
        return
    from huggingface_hub import constants

    raise ConfigError(
        key,
        repo_id,
        f"a model in the local Hugging Face cache ({constants.HF_HUB_CACHE}) or a reachable "
        f"hub: it is not in the cache and the hub is offline ({why}); download it where the "
        f"hub is reachable (hf download {repo_id}), point HF_HUB_CACHE at a cache that has "
        "it, or give a local checkpoint directory",
    )


def hub_dataset(key: str, hub_id: str, split: str, name: Optional[str] = None) -> Any:
    """A hub dataset split (needs network or a local HF cache); errors name `key`."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            key, hub_id, "a local source, or install the extra: pip install 'qexp[hub]' (datasets)"
        ) from None
    try:
        return datasets.load_dataset(hub_id, name, split=split)
    except Exception as e:  # offline, missing, wrong split: one line, not a traceback
        raise ConfigError(
            key,
            hub_id,
            f"a dataset (split {split!r}) in the local HF cache or on a reachable hub "
            f"({_first_line(e)}); or a local file",
        ) from None
