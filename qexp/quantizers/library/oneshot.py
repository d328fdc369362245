"""compressed-tensors' read-back, shared by the back-ends that quantize through llm-compressor's
`oneshot` (qexp/core/oneshot.py; qexp/quantizers/library/llmcompressor.py: GPTQ/AWQ/W8A8;
.../compressed.py: FP8, NVFP4, MXFP4).

- `compressed_modules`: each quantized module's weight packed and unpacked by compressed-tensors'
  own compressor (as `save_pretrained(save_compressed=True)` and a loader do), with the
  module's forward for the kernel check (activation quantization switched off for it: the
  check compares weights);
- `save_compressed`: the compressed-tensors checkpoint, leaving the model as it was;
- `module_formats`: the compressed-tensors format of every quantized module (results.json).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qexp.core.oneshot import INSTALL
from qexp.quantizers.library.base import Library, ReadBack

LLMCOMPRESSOR = Library(
    "llmcompressor",
    INSTALL,
    "llm-compressor",
    ("llmcompressor", "compressed-tensors"),
    "llmcompressor",
)


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
