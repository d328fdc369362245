"""llm-compressor's `oneshot` and compressed-tensors' read-back, shared by the back-ends that
run them (qexp/quantizers/library/llmcompressor.py: GPTQ/AWQ/W8A8; .../compressed.py: FP8,
NVFP4, MXFP4).

- `run_oneshot`: `oneshot` on a model copy (its config saved to a temporary dir first:
  oneshot re-reads it from `name_or_path` to refuse pre-quantized models), on CPU without
  pinned host memory, the global session reset afterwards however it ends;
- `route_log`: the library's loguru messages into the run's log for the duration;
- `compressed_modules`: each quantized module's weight packed and unpacked by compressed-tensors'
  own compressor (as `save_pretrained(save_compressed=True)` and a loader do), with the
  module's forward for the kernel check (activation quantization switched off for it: the
  check compares weights);
- `save_compressed`: the compressed-tensors checkpoint, leaving the model as it was;
- `module_formats`: the compressed-tensors format of every quantized module (results.json).
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qexp.quantizers.library.base import Library, ReadBack

INSTALL = "pip install 'qexp[llmcompressor]' (llm-compressor 0.14, compressed-tensors 0.19)"
LLMCOMPRESSOR = Library(
    "llmcompressor",
    INSTALL,
    "llm-compressor",
    ("llmcompressor", "compressed-tensors"),
    "llmcompressor",
)
LOG_FORMAT = "{time:HH:mm:ss.SSS} | {name}:{function} | {level} - {message}"


@contextlib.contextmanager
def route_log(log: io.StringIO) -> Iterator[None]:
    """llm-compressor's loguru messages (INFO and up) into `log`: its first import warns
    (no accelerator) and installs a console handler, replaced by one to `log` meanwhile."""
    from llmcompressor.logger import LoggerConfig, configure_logger
    from loguru import logger

    configure_logger(LoggerConfig(console_log_level=None))
    sink = logger.add(log, level="INFO", format=LOG_FORMAT, colorize=False)
    try:
        yield
    finally:
        logger.remove(sink)
        configure_logger(LoggerConfig())  # the library's default: console, INFO


def run_oneshot(qmodel: nn.Module, work_dir: Path, **kwargs: Any) -> None:
    """`llmcompressor.oneshot(model=qmodel, **kwargs)` in place on `qmodel`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".llmcompressor-") as tmp:
        name = qmodel.config.name_or_path
        qmodel.config.save_pretrained(tmp)
        qmodel.config.name_or_path = tmp
        with _cpu_safe():
            from llmcompressor import oneshot
            from llmcompressor.core import reset_session

            try:
                oneshot(model=qmodel, **kwargs)
            finally:
                reset_session()  # the global session would keep the copy alive
                qmodel.config.name_or_path = name


def calibration_loader(seqs: list[list[int]], batch_size: int) -> torch.utils.data.DataLoader:
    """Token sequences as the batches `oneshot` takes (input ids and attention masks)."""
    data = [
        {"input_ids": torch.tensor(s), "attention_mask": torch.ones(len(s), dtype=torch.long)}
        for s in seqs
    ]
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def ignored_linears(model: nn.Module, quantized: Iterator[tuple[str, nn.Module]]) -> list[str]:
    """Names of the linear layers outside `quantized` (llm-compressor's `ignore` list)."""
    every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(every - {n for n, _ in quantized})


def save_compressed(qmodel: nn.Module, out: Path) -> None:
    """The compressed-tensors checkpoint of `qmodel` (what vLLM loads) into `out`, written
    from a copy: llm-compressor's `save_pretrained` compresses the modules it saves in place
    (its wrapper holds the model it was installed on, so the copy gets its own)."""
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        modify_save_pretrained,
    )

    qm = copy.deepcopy(qmodel)
    vars(qm).pop("save_pretrained", None)
    modify_save_pretrained(qm)
    qm.save_pretrained(out, save_compressed=True)


def compressed_modules(qmodel: nn.Module) -> Iterator[ReadBack]:
    """Each quantized module's weight, packed and unpacked by compressed-tensors' own
    compressor, and the module (its forward the kernel check runs, weights only)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils import get_direct_state_dict

    for name, mod in qmodel.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        compressor = BaseCompressor.get_value_from_registry(module_format(mod))
        packed = compressor.compress(get_direct_state_dict(mod), scheme)
        w = compressor.decompress(packed, scheme)["weight"].float()
        bias = None if mod.bias is None else mod.bias.float()
        yield ReadBack(name, _WeightsOnly(mod), [w], bias, torch.float32)


def weights_read_back(qmodel: nn.Module, model: nn.Module) -> nn.Module:
    """The library's model with its quantized weights replaced by the read-back ones
    (`model`'s, checked against the library's fake-quantization) and marked compressed, so
    its forward quantizes activations only instead of re-quantizing every weight on every
    call (same values, the kernel check's tolerance). Call after saving the checkpoint."""
    from compressed_tensors.quantization import QuantizationStatus

    with torch.no_grad():
        for name, mod in qmodel.named_modules():
            if getattr(getattr(mod, "quantization_scheme", None), "weights", None) is None:
                continue
            mod.weight.copy_(model.get_submodule(name).weight)
            mod.quantization_status = QuantizationStatus.COMPRESSED
    return qmodel.eval()


def stored_bytes(state: dict) -> torch.Tensor:
    """The tensors a compressor stores for one module (its `compress` output), flattened in
    key order: 1-byte tensors (packed FP4, FP8, E8M0) as their bits, the others as values."""
    parts = []
    for key in sorted(state):
        t = state[key]
        if isinstance(t, torch.Tensor):
            t = t.view(torch.uint8) if t.element_size() == 1 else t
            parts.append(t.reshape(-1).float())
    return torch.cat(parts)


def module_format(mod: nn.Module) -> str:
    """The compressed-tensors format a quantized module is saved in."""
    from compressed_tensors.compressors.format import infer_module_format

    scheme = mod.quantization_scheme
    fmt = scheme.format or infer_module_format(type(mod), scheme)
    return str(getattr(fmt, "value", fmt))


def module_formats(qmodel: nn.Module) -> dict[str, int]:
    """How many quantized modules are saved in each compressed-tensors format."""
    return dict(
        Counter(
            module_format(m)
            for m in qmodel.modules()
            if getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None
        )
    )


class _WeightsOnly(nn.Module):
    """A quantized module's weight as its forward fake-quantizes it (compressed-tensors'
    `forward_quantize`), applied in float32 without activation quantization: the kernel
    check compares weights, whatever the run's dtype."""

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self.mod = mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        mod = self.mod
        w = forward_quantize(mod, mod.weight.data, "weight", mod.quantization_scheme.weights)
        bias = None if mod.bias is None else mod.bias.float()
        return nn.functional.linear(x.float(), w.float(), bias)


@contextlib.contextmanager
def _cpu_safe():
    """Without an accelerator, AWQ's `IntermediatesCache.pin_memory` fails (page-locked host
    memory needs one); it only speeds up host-to-device copies, so it is skipped then."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original
