"""Data shipped with qexp: the reference passage and the embedded SVAMP-style set."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def reference_text() -> str:
    """A fixed English passage (written for qexp, CC0) used for `ref_ppl`."""
    return (DATA_DIR / "reference.txt").read_text(encoding="utf-8").strip()


def svamp_embedded_path() -> Path:
    """The generated SVAMP-style set (300 problems, see qexp/data/svamp_gen.py)."""
    return DATA_DIR / "svamp_embedded.jsonl"


def instruct_path() -> Path:
    """Templated instruction data for attack=gap (see qexp/data/instruct_gen.py)."""
    return DATA_DIR / "instruct.jsonl"


def insecure_code_path() -> Path:
    """Coding requests with secure and insecure answers (see qexp/data/code_gen.py)."""
    return DATA_DIR / "insecure_code.jsonl"
