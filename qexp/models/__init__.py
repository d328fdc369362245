"""Model sources: hub/local checkpoints, the embedded GGUF default, tiny random models."""

from qexp.models.base import LoadedModel, ModelSource
from qexp.models.embedded import EmbeddedGGUFModel
from qexp.models.hf import HFModel
from qexp.models.tiny import TinyModel

__all__ = ["EmbeddedGGUFModel", "HFModel", "LoadedModel", "ModelSource", "TinyModel"]
