"""llm-compressor's `oneshot`, shared by the quantizer back-ends that run it
(qexp/quantizers/library/) and the pruners (qexp/pruners/library.py); the library is
imported lazily, when a run uses it.

- `run_oneshot`: `oneshot` on a model (its config saved to a temporary dir first: oneshot
  re-reads it from `name_or_path` to refuse pre-quantized models), on CPU without pinned host
  memory, the global session reset afterwards however it ends;
- `route_log`: the library's loguru messages into the run's log for the duration;
- `calibration_loader`, `ignored_linears`: its dataset and `ignore` list.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

INSTALL = "pip install 'qexp[llmcompressor]' (llm-compressor 0.14, compressed-tensors 0.19)"
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
