"""Loading a Hugging Face checkpoint the way a user does (safetensors only, remote code off
unless asked), shared by model=hf and model=smollm2_135m (the embedded model)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import transformers

from qexp.checkpoint.reader import Checkpoint
from qexp.checkpoint.safetensors_io import SafetensorsError
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.core.memory import device_map
from qexp.models.base import LoadedModel, finish_loading

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def looks_like_path(ident: str) -> bool:
    """A local path rather than a hub id `org/name`."""
    return ident.startswith(("/", "./", "../", "~")) or Path(ident).expanduser().exists()


def check_checkpoint_dir(key: str, path: Path) -> None:
    """A directory with config.json and safetensors weights, or a ConfigError."""
    if not path.is_dir():
        raise ConfigError(key, str(path), "an existing local directory or a hub id org/name")
    if not (path / "config.json").exists():
        raise ConfigError(key, str(path), "a Hugging Face checkpoint directory with config.json")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(
            key,
            str(path),
            "a checkpoint with *.safetensors weights (pickled .bin files are never loaded)",
        )
    try:  # headers, index and shapes only (qexp/checkpoint/reader.py): no weight is read
        Checkpoint(path, key).close()
    except (SafetensorsError, OSError) as e:
        raise ConfigError(key, str(path), f"a checkpoint that passes qexp's reader ({e})") from None


def load_pretrained(
    ident: str,
    ctx: RunContext,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    key: str = "model.id",
) -> LoadedModel:
    """Load model + tokenizer with safetensors only and remote code off unless asked; a
    checkpoint that transformers cannot read is one ConfigError naming `key`."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(ident, **kwargs)
        placed = None
        if ctx.device.type == "cuda":  # straight onto the GPU(s), not through host memory
            config = load_config(ident, revision, trust_remote_code, key)
            placed = device_map(config, ctx.dtype, ctx.device)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ident,
            dtype=ctx.dtype,
            use_safetensors=True,
            low_cpu_mem_usage=True,
            device_map=placed,
            **kwargs,
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {first[0] if first else ''}"
        raise ConfigError(key, ident, f"a checkpoint transformers can load ({why})") from None
    return finish_loading(model, tok, ident, ctx)


def load_config(
    ident: str, revision: Optional[str], trust_remote_code: bool, key: str
) -> PretrainedConfig:
    """config.json of a local dir or a hub id (cached, or fetched: a few KB)."""
    try:
        return transformers.AutoConfig.from_pretrained(
            ident, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {first[0] if first else ''}"
        raise ConfigError(key, ident, f"a checkpoint with a readable config.json ({why})") from None
