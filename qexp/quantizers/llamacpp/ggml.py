"""ctypes bindings to llama.cpp's quantizers (libggml-base): the reference GGUF encoder.

`ggml_quantize_chunk` is the function `llama-quantize` calls for every tensor (rows split
over threads, an optional per-column importance matrix), so calling it on a tensor's rows
gives the bytes llama.cpp writes. Read-back is `gguf.quants.dequantize`, bit-identical to
ggml's own `to_float` (tests/test_llamacpp.py checks both).

The library is looked up in this order: `$QEXP_GGML_LIB` (a file), the copy
`qexp-build-ggml` installs in the environment, the one inside an installed
llama-cpp-python (`pip install 'qexp[llamacpp]'`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from qexp.core.context import available_cores
from qexp.quantizers.llamacpp.build import COMMIT, INFO, default_dir

INSTALL = (
    "run `qexp-build-ggml` (builds llama.cpp's quantizer library in ~1 min; `make setup` "
    "does it) or pip install 'qexp[llamacpp]' (llama-cpp-python, a 15-30 min build)"
)


class MissingLibrary(RuntimeError):
    """libggml-base is not installed."""


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def candidates() -> list[Path]:
    """Where libggml-base is looked for, in order."""
    out = []
    if os.environ.get("QEXP_GGML_LIB"):
        out.append(Path(os.environ["QEXP_GGML_LIB"]))
    out.append(default_dir() / "libggml-base.so")
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin:
        out.append(Path(spec.origin).parent / "lib" / "libggml-base.so")
    return out


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded libggml-base, signatures declared."""
    found = next((p for p in candidates() if p.is_file()), None)
    if found is None:
        raise MissingLibrary(
            "llama.cpp's libggml-base was not found (looked in "
            + ", ".join(map(str, candidates()))
            + "): "
            + INSTALL
        )
    lib = ctypes.CDLL(str(found))
    i64, size, vp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    sigs = {
        "ggml_quantize_chunk": (size, [ctypes.c_int, vp, vp, i64, i64, i64, vp]),
        "ggml_quantize_init": (None, [ctypes.c_int]),
        "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
        "ggml_row_size": (size, [ctypes.c_int, i64]),
        "ggml_blck_size": (i64, [ctypes.c_int]),
        "ggml_get_type_traits": (ctypes.POINTER(_Traits), [ctypes.c_int]),
        "ggml_validate_row_data": (ctypes.c_bool, [ctypes.c_int, vp, size]),
        "ggml_version": (ctypes.c_char_p, []),
        "ggml_commit": (ctypes.c_char_p, []),
    }
    for fn, (res, args) in sigs.items():
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    lib.path = str(found)
    return lib


def available() -> bool:
    """Whether libggml-base can be loaded."""
    try:
        library()
    except MissingLibrary:
        return False
    return True


def version() -> dict:
    """ggml's version and llama.cpp commit, and which library file answered."""
    lib = library()
    commit = lib.ggml_commit().decode()
    built = Path(lib.path).parent / INFO  # qexp-build-ggml's record (no git in an sdist)
    if commit == "unknown" and built.is_file():
        commit = json.loads(built.read_text())["commit"]
    return {
        "ggml": lib.ggml_version().decode(),
        "commit": commit,
        "checked_commit": COMMIT,
        "path": lib.path,
    }


def gtype(name: str) -> GGMLQuantizationType:
    """GGML type from its name (`q4_k`, `Q6_K`, `iq4_xs`, `f16`)."""
    return GGMLQuantizationType[name.upper()]


def block_size(t: GGMLQuantizationType) -> int:
    return int(library().ggml_blck_size(int(t)))


def quantize(
    x: np.ndarray, t: GGMLQuantizationType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """llama.cpp's bytes for float32 rows `x` [rows, cols]: uint8 [rows, row_size]."""
    lib = library()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    blck = block_size(t)
    if cols % blck:  # ggml only asserts this in debug builds and writes garbage otherwise
        raise ValueError(f"row length {cols} is not a multiple of {t.name}'s block {blck}")
    im = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (cols,):
            raise ValueError(f"imatrix has shape {imatrix.shape}, expected ({cols},)")
        im = imatrix.ctypes.data
    elif lib.ggml_quantize_requires_imatrix(int(t)):  # ggml would abort the process
        raise ValueError(f"{t.name} requires an importance matrix")
    row = int(lib.ggml_row_size(int(t), cols))
    out = np.empty((rows, row), dtype=np.uint8)

    def chunk(lo_hi: tuple[int, int]) -> int:
        lo, hi = lo_hi
        return lib.ggml_quantize_chunk(
            int(t), x[lo:hi].ctypes.data, out[lo:hi].ctypes.data, 0, hi - lo, cols, im
        )

    # rows are independent: splitting them over threads gives the same bytes (as llama.cpp)
    n = max(1, min(available_cores(), rows // 64 or 1))
    edges = np.linspace(0, rows, n + 1).astype(int)
    with ThreadPoolExecutor(n) as pool:
        written = sum(pool.map(chunk, zip(edges[:-1], edges[1:])))
    if written != out.size or not lib.ggml_validate_row_data(int(t), out.ctypes.data, out.size):
        raise RuntimeError(f"ggml_quantize_chunk wrote invalid {t.name} data")
    return out


def to_float(data: np.ndarray, t: GGMLQuantizationType, cols: int) -> np.ndarray:
    """ggml's own de-quantizer (type traits `to_float`): float32 [rows, cols]."""
    fn = _TO_FLOAT(library().ggml_get_type_traits(int(t)).contents.to_float)
    data = np.ascontiguousarray(data)
    out = np.empty((data.shape[0], cols), dtype=np.float32)
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out


def read_back(data: np.ndarray, t: GGMLQuantizationType) -> np.ndarray:
    """De-quantized float32 [rows, cols] with the `gguf` package (what readers compute)."""
    return dequantize(data, t)
