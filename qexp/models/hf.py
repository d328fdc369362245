"""Hugging Face causal LMs from a hub id or a local directory (safetensors only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from transformers import AutoModelForCausalLM, AutoTokenizer

from qexp.context import RunContext
from qexp.errors import ConfigError, check
from qexp.models.base import LoadedModel, ModelSource, finish_loading


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


def load_pretrained(
    ident: str, ctx: RunContext, revision: Optional[str] = None, trust_remote_code: bool = False
) -> LoadedModel:
    """Load model + tokenizer with safetensors only and remote code off unless asked."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(ident, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        ident, dtype=ctx.dtype, use_safetensors=True, low_cpu_mem_usage=True, **kwargs
    )
    return finish_loading(model, tok, ident, ctx)


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

    def load(self, ctx: RunContext) -> LoadedModel:
        ident = str(Path(self.id).expanduser()) if looks_like_path(self.id) else self.id
        return load_pretrained(ident, ctx, self.revision, self.trust_remote_code)
