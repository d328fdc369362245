"""Hugging Face causal LMs from a hub id or a local directory (safetensors only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from qexp.core.context import RunContext
from qexp.core.errors import check
from qexp.core.hub import require_hub_model
from qexp.models.base import LoadedModel, ModelSource
from qexp.models.loading import check_checkpoint_dir, load_config, load_pretrained, looks_like_path

if TYPE_CHECKING:
    from transformers import PretrainedConfig


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
