"""The .gguf file llama.cpp loads, written as the user's path writes it.

`convert_hf_to_gguf.py` (llama.cpp's own converter, installed by `qexp-build-ggml`) turns
the model into a 16-bit GGUF file: metadata, tokenizer, tensor names, the q/k row
permutation. Then, as `llama-quantize` does, every tensor the type mix names is encoded by
`ggml_quantize_chunk` with its type and importance column, the rest copied, and
`general.file_type` set. `check_file` proves that the file holds what qexp evaluated: every
quantized tensor de-quantizes (with ggml's own `to_float`) to the model's weights, row for
row up to the converter's q/k row permutation.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tqdm.auto import tqdm

from qexp.core.plugin import Subject
from qexp.quantizers.llamacpp import ggml
from qexp.quantizers.llamacpp.build import converter_dir

log = logging.getLogger(__name__)

UNQUANTIZED = ("F32", "F16", "BF16")


def _converter() -> Path:
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ggml.MissingLibrary(
            f"llama.cpp's converter is not installed ({script}): run `qexp-build-ggml`"
        )
    if importlib.util.find_spec("sentencepiece") is None:  # the converter imports it
        raise ggml.MissingLibrary(
            "llama.cpp's converter needs sentencepiece: pip install 'qexp[convert]'"
        )
    return script


@contextmanager
def converted(subject: Subject, parent: Path, outtype: str) -> Iterator[Path]:
    """`subject` through llama.cpp's converter: a temporary 16-bit GGUF file under `parent`
    (the checkpoint it reads is saved as safetensors and removed once converted)."""
    script = _converter()
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=parent) as tmp:
        hf = Path(tmp) / f"qexp-{subject.branch}"  # the converter names the model after it
        subject.model.save_pretrained(hf, safe_serialization=True)
        subject.tokenizer.save_pretrained(hf)
        out = Path(tmp) / f"model-{outtype}.gguf"
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        env["HF_HUB_OFFLINE"] = "1"
        cmd = [sys.executable, str(script), str(hf), "--outtype", outtype, "--outfile", str(out)]
        log.info("%s: convert_hf_to_gguf.py --outtype %s", subject.branch, outtype)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(
                f"llama.cpp's convert_hf_to_gguf.py failed (exit {r.returncode}):\n"
                + r.stderr[-3000:]
            )
        shutil.rmtree(hf)
        yield out


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: set[str]) -> None:
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name in skip:
            continue
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), kind, sub_type=sub)


def requantize(
    src: Path,
    out: Path,
    types: Mapping[str, str],
    imatrix: Mapping[str, np.ndarray],
    ftype: str,
    imatrix_meta: Mapping[str, object] | None = None,
    progress: bool = False,
) -> None:
    """llama-quantize's pass over the converter's file `src`, written atomically to `out`.

    `types`: GGUF tensor name -> GGML type; `imatrix`: GGUF name -> per-column importance.
    """
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tensors = sorted(reader.tensors, key=lambda t: _load_order(t.name))
    missing = sorted(set(types) - {t.name for t in tensors})
    left = [t.name for t in tensors if t.name not in types and len(t.shape) > 1]
    if missing or left:
        raise RuntimeError(
            f"the converter's tensors differ from the type mix: missing {missing}, not typed {left}"
        )
    part = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(part, arch, use_temp_file=False)
    # as llama-quantize: the input's keys, then the quantization version and file type
    # re-set (so moved last), then the imatrix keys (llama-quantize's KV overrides)
    general = gguf.Keys.General
    _copy_metadata(reader, writer, {general.QUANTIZATION_VERSION, general.FILE_TYPE})
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType["MOSTLY_" + ftype.upper()])
    for key, value in (imatrix_meta or {}).items():
        writer.add_key_value(key, value, _value_type(value))
    lib = ggml.library()
    for t in tensors:
        if t.name in types:
            q = ggml.gtype(types[t.name])
            cols = int(t.shape[0])
            rows = int(np.prod(t.shape[1:]))
            nbytes = rows * int(lib.ggml_row_size(int(q), cols))
            writer.add_tensor_info(t.name, [rows, nbytes // rows], np.uint8, nbytes, q)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for t in tqdm(tensors, desc=f"write {out.name}", disable=not progress, leave=False):
            if t.name in types:
                rows = dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
                data = ggml.quantize(rows, ggml.gtype(types[t.name]), imatrix.get(t.name))
            else:
                data = t.data
            writer.write_tensor_data(data)
        writer.close()
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    part.replace(out)


def _load_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (its loader's `weight_name_comparer`, which llama-quantize
    writes in): tensors outside the blocks first, then by block, each by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _value_type(value: object) -> gguf.GGUFValueType:
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, int):  # llama-quantize's integer overrides are written as uint32
        return gguf.GGUFValueType.UINT32
    raise TypeError(f"unsupported GGUF metadata value {value!r}")


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` and `b` hold the same rows, in the same order or permuted (q/k)."""
    if np.array_equal(a, b):
        return True

    def rows(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        return np.sort(x.view(np.dtype((np.void, x.shape[1] * x.itemsize))).ravel())

    return bool(np.array_equal(rows(a), rows(b)))


def check_file(path: Path, weights: Mapping[str, torch.Tensor]) -> int:
    """Check every quantized tensor of `path` against the evaluated weights (GGUF name ->
    weight, in the model's dtype): same rows after de-quantizing and casting to that dtype.
    Returns how many tensors were checked; raises RuntimeError naming the first mismatch."""
    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    for name, w in weights.items():
        t = found.get(name)
        if t is None:
            raise RuntimeError(f"{path.name}: tensor {name} is missing")
        if t.tensor_type.name in UNQUANTIZED:
            deq = dequantize(t.data, t.tensor_type)
        else:  # llama.cpp's own de-quantizer (what its kernels compute with)
            deq = ggml.to_float(t.data.reshape(w.shape[0], -1), t.tensor_type, w.shape[-1])
        deq = torch.from_numpy(np.ascontiguousarray(deq).reshape(w.shape[0], -1))
        a = deq.to(w.dtype).view(torch.int16 if w.element_size() == 2 else torch.int32)
        b = w.detach().cpu().contiguous().view(a.dtype)
        if a.shape != b.shape or not _same_rows(a.numpy(), b.numpy()):
            raise RuntimeError(
                f"{path.name}: tensor {name} ({t.tensor_type.name}) does not de-quantize to "
                "the weights qexp evaluated"
            )
    return len(weights)
