"""AutoRound (signed-gradient rounding and clipping, SignRound) through `auto-round`.

Block by block, AutoRound tunes a rounding offset per weight and a clipping range per group
by signed gradient descent on the block's output for the calibration sequences
(qexp/quantizers/calib.py), `iters` steps at AutoRound's learning rate (1/iters unless
`lr` is set). It runs on a copy of the model; the tuned weights (what the library packs)
are written in AutoRound's own `auto_round` format, which transformers loads with the
library's CPU kernel; each module's kernel output on a probe input must match the
de-quantized weight (relative error within `kernel_tol`, recorded) before it is copied into
the full-precision model, so the evaluated model is the one a user loads from the files.

On CPU without auto-round-lib, transformers runs that kernel in float16 (it says "Forced
model to torch.float16"), hence the tolerance. auto-round 0.15.1 is the newest release
llm-compressor 0.14 accepts; its `auto_round` format packs symmetric weights only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
import transformers

from qexp.core.context import RunContext
from qexp.core.errors import check
from qexp.core.plugin import Subject
from qexp.quantizers.library.base import CalibratedQuantizer, Library, ReadBack

FORMAT = "auto_round"
INSTALL = "pip install 'qexp[autoround]' (auto-round 0.15.1)"


@dataclass
class AutoRoundQuant(CalibratedQuantizer):
    """`bits` per group of `group_size` input weights, symmetric, tuned for `iters` steps."""

    library: ClassVar[Library] = Library(
        "auto_round", INSTALL, "AutoRound", ("auto-round",), "autoround"
    )
    group_fit_why: ClassVar[str] = " (its kernels refuse to load a layer the group does not divide)"
    fixed_skip: ClassVar[Optional[str]] = "AutoRound quantizes the decoder blocks' linears only"
    saves_artifact: ClassVar[bool] = True
    data_dependent: ClassVar[bool] = True

    name: str = "autoround4"
    group_size: int = 64
    sym: bool = True
    iters: int = 200
    lr: Optional[float] = None
    batch_size: int = 8
    kernel_tol: float = 5e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.sym is True,
            "sym",
            self.sym,
            "true (auto-round 0.15.1 cannot write asymmetric weights in its auto_round format: "
            "TypeError in WQLinear_GEMM)",
        )
        check(self.iters >= 1, "iters", self.iters, "an integer >= 1 (AutoRound's default: 200)")
        check(self.lr is None or self.lr > 0, "lr", self.lr, "null (1/iters) or a number > 0")

    def route_stderr(self, log: io.StringIO, ctx: RunContext) -> contextlib.AbstractContextManager:
        """AutoRound's per-block progress bar stays on the console when `progress` is on."""
        return contextlib.nullcontext() if ctx.progress else contextlib.redirect_stderr(log)

    @contextlib.contextmanager
    def route_log(self, log: io.StringIO, path: Path) -> Iterator[None]:
        """AutoRound's own console handler (per-block losses) writes into `log`."""
        import auto_round  # noqa: F401  (its first import installs the console handler)

        handlers = [
            h
            for h in logging.getLogger("autoround").handlers
            if isinstance(h, logging.StreamHandler)
        ]
        streams = [h.setStream(log) for h in handlers]
        try:
            yield
        finally:
            for h, s in zip(handlers, streams):
                h.setStream(s)

    def run_library(self, subject: Subject, ctx: RunContext, log: io.StringIO) -> dict:
        model, tok = subject.model, subject.tokenizer
        names = [n for n, _ in self.quantized_linears(model)]
        data = [torch.tensor([s]) for s in self.calibration_sequences(subject, ctx)]
        device = next(model.parameters()).device
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".autoround-") as tmp,
            _work_space(Path(tmp) / "work"),
        ):
            from auto_round import AutoRound

            with torch.enable_grad():
                tuner = AutoRound(
                    copy.deepcopy(model),
                    tokenizer=tok,
                    bits=self.bits,
                    group_size=self.group_size,
                    sym=self.sym,
                    iters=self.iters,
                    lr=self.lr,
                    dataset=data,
                    nsamples=len(data),
                    seqlen=self.calibration.seq_len,
                    batch_size=min(self.batch_size, len(data)),
                    device_map=str(device),
                    seed=ctx.seed,
                    enable_torch_compile=False,
                )
                tuned, _ = tuner.quantize()
            mods = dict(tuned.named_modules())
            deq = {n: mods[n].weight.detach().float().clone() for n in names}
            dst = Path(tmp) / "quantized"
            tuner.save_quantized(str(dst), format=FORMAT)
            del tuner, tuned, mods
            # the written model, loaded as a user would, with the library's CPU kernel
            loaded = transformers.AutoModelForCausalLM.from_pretrained(dst, device_map=str(device))
            kernels = sorted({_kernel(loaded.get_submodule(n), n) for n in names})
            checks = self.read_back(_modules(loaded, model, deq), model)
            del loaded
            info = {
                "bits": self.bits,
                "group_size": self.group_size,
                "iters": self.iters,
                "calibration": self.calibration.describe(),
                "format": FORMAT,
                "kernel": ", ".join(kernels),
                **self.kernel_info(checks),
            }
            if ctx.save_quantized:
                write = lambda out: shutil.copytree(dst, out, dirs_exist_ok=True)  # noqa: E731
                info.update(self.save_artifact(ctx, subject.branch, write))
        return info


def _kernel(mod: torch.nn.Module, name: str) -> str:
    """The reloaded module's class (a library kernel, never a plain Linear)."""
    if isinstance(mod, torch.nn.Linear):
        raise RuntimeError(f"{name}: AutoRound's checkpoint left this layer unquantized")
    return f"{type(mod).__module__}.{type(mod).__name__}"


def _modules(
    loaded: torch.nn.Module, model: torch.nn.Module, deq: dict[str, torch.Tensor]
) -> Iterator[ReadBack]:
    """Each tuned weight against the reloaded kernel (which adds the model's own bias)."""
    for name, w in deq.items():
        mod, lin = loaded.get_submodule(name), model.get_submodule(name)
        dtype = next(t.dtype for t in mod.buffers() if t.is_floating_point())
        bias = None if lin.bias is None else lin.bias.detach().float()
        yield ReadBack(name, mod, [w], bias, dtype, copy_bias=False)


@contextlib.contextmanager
def _work_space(path: Path) -> Iterator[None]:
    """AutoRound's scratch directory (`./ar_work_space` by default) inside the run's temp."""
    old = os.environ.get("AR_WORK_SPACE")
    os.environ["AR_WORK_SPACE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AR_WORK_SPACE", None)
        else:
            os.environ["AR_WORK_SPACE"] = old
