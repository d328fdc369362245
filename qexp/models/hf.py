"""Hugging Face causal LMs from a hub id or a local directory (safetensors only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import transformers

from qexp.context import RunContext
from qexp.errors import ConfigError, check
from qexp.hub import require_hub_model
from qexp.models.base import LoadedModel, ModelSource, finish_loading
from qexp.safetensors_io import SafetensorsError, read_header

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
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ConfigError(
            key,
            str(path),
            "a checkpoint with *.safetensors weights (pickled .bin files are never loaded)",
        )
    for shard in shards:  # headers only: a truncated or corrupt shard is refused here
        try:
            read_header(shard)
        except (SafetensorsError, OSError) as e:
            raise ConfigError(key, str(path), f"a checkpoint with intact shards ({e})") from None


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
            from qexp.memory import device_map  # qexp.memory reads qexp.models' geometry

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


@dataclass
class HFModel(ModelSource):
    """`model.id`: a hub id (`org/name`) or a local checkpoint directory."""

    name: str = "hf"
    id: str = "???"
    revision: Optional[str] = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if looks_like_path(self.id):
            check_checkpoint_dir("id", Path(self.id).expanduser())
        else:
            parts = self.id.split("/")
            check(
                len(parts) == 2 and all(parts),
                "id",
                self.id,
                "a hub id org/name or a local checkpoint directory",
            )

    def fingerprint(self) -> Any:
        """Local dirs: each file's name, size and mtime; hub ids: the revision (pin one, e.g.
        a commit hash, so that a cached stage cannot outlive an upstream change)."""
        if not looks_like_path(self.id):
            return self.revision
        root = Path(self.id).expanduser()
        return sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file()
        )

    @property
    def ident(self) -> str:
        """What transformers loads: the expanded local path, or the hub id."""
        return str(Path(self.id).expanduser()) if looks_like_path(self.id) else self.id

    def hf_config(self, ctx: RunContext) -> PretrainedConfig:
        if not looks_like_path(self.id):  # not cached and the hub is offline: say so now
            require_hub_model("model.id", self.id, self.revision)
        return load_config(self.ident, self.revision, self.trust_remote_code, "model.id")

    def load(self, ctx: RunContext) -> LoadedModel:
        return load_pretrained(self.ident, ctx, self.revision, self.trust_remote_code)
