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
import importlib.metadata
import importlib.util
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, List, Optional

import torch
import transformers

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.io import atomic_dir, atomic_write_text
from qexp.core.plugin import StageResult, Subject
from qexp.quantizers.base import (
    Quantizer,
    check_group_size,
    model_widths,
    require_group_fit,
    require_library,
)
from qexp.quantizers.calib import Calibration
from qexp.quantizers.library.base import copy_checked, relative_error

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EXTRA = "pip install 'qexp[autoround]' (auto-round 0.15.1)"
FORMAT = "auto_round"


@dataclass
class AutoRoundQuant(Quantizer):
    """`bits` per group of `group_size` input weights, symmetric, tuned for `iters` steps."""

    name: str = "autoround4"
    bits: int = 4
    group_size: int = 64
    sym: bool = True
    iters: int = 200
    lr: Optional[float] = None
    batch_size: int = 8
    kernel_tol: float = 5e-3
    skip: List[str] = field(default_factory=lambda: ["lm_head"])
    calibration: Calibration = field(default_factory=Calibration)

    saves_artifact: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (2, 3, 4, 8))
        check_group_size(self.group_size, per_channel=True)
        check(
            self.sym is True,
            "sym",
            self.sym,
            "true (auto-round 0.15.1 cannot write asymmetric weights in its auto_round format: "
            "TypeError in WQLinear_GEMM)",
        )
        check(self.iters >= 1, "iters", self.iters, "an integer >= 1 (AutoRound's default: 200)")
        check(self.lr is None or self.lr > 0, "lr", self.lr, "null (1/iters) or a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.kernel_tol > 0, "kernel_tol", self.kernel_tol, "a number > 0")
        check(
            self.skip == ["lm_head"],
            "skip",
            self.skip,
            "[lm_head] (AutoRound quantizes every linear of the decoder blocks, never lm_head)",
        )

    def check_model(self, config) -> None:
        require_library("auto_round", self.name, EXTRA)
        super().check_model(config)

    def check_widths(self, widths: list[int]) -> None:
        """AutoRound pads a row the group does not divide, but no CPU kernel loads it."""
        if self.group_size == -1:
            return
        why = " (AutoRound's kernels refuse to load a layer the group does not divide)"
        require_group_fit(widths, self.group_size, "AutoRound", per_channel=True, why=why)

    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        model, tok = subject.model, subject.tokenizer
        names = [n for n, _ in self.quantized_linears(model)]
        self.check_widths(model_widths(model, self.skip))
        seqs = self.calibration.sequences(model, tok, ctx.seed)
        data = [torch.tensor([s]) for s in seqs]
        device = next(model.parameters()).device
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        log_file = f"logs/autoround_{subject.branch}.log"
        with (
            tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".autoround-") as tmp,
            _library_log(ctx.run_dir / log_file, ctx.progress),
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
            checks, kernel = self._read_back(loaded, model, deq)
            del loaded
            if ctx.save_quantized:
                with atomic_dir(ctx.run_dir / "quantized" / subject.branch) as out:
                    shutil.copytree(dst, out, dirs_exist_ok=True)
        info = {
            "library": f"auto-round {importlib.metadata.version('auto-round')}",
            "bits": self.bits,
            "group_size": self.group_size,
            "iters": self.iters,
            "calibration": self.calibration.describe(),
            "format": FORMAT,
            "kernel": kernel,
            "modules": len(checks),
            "kernel_vs_dequant_max_rel_err": max(checks.values()),
        }
        if ctx.save_quantized:
            info["artifact"] = str(Path("quantized") / subject.branch)
        return StageResult(model, info, [log_file])

    def _read_back(
        self, loaded: PreTrainedModel, model: PreTrainedModel, deq: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], str]:
        """Copy each tuned weight into `model` once the reloaded kernel reproduced it."""
        errs: dict[str, float] = {}
        g = torch.Generator().manual_seed(0)
        kernels = set()
        for name, w in deq.items():
            mod, lin = loaded.get_submodule(name), model.get_submodule(name)
            if isinstance(mod, torch.nn.Linear):
                raise RuntimeError(f"{name}: AutoRound's checkpoint left this layer unquantized")
            kernels.add(f"{type(mod).__module__}.{type(mod).__name__}")
            x = torch.randn(4, lin.in_features, generator=g).to(lin.weight.device)
            dtype = next(t.dtype for t in mod.buffers() if t.is_floating_point())
            y_lib = mod(x.to(dtype)).float()
            bias = None if lin.bias is None else lin.bias.detach().float()
            rel = relative_error(torch.nn.functional.linear(x, w, bias), y_lib)
            copy_checked(lin, w, None, rel, self.kernel_tol, name, "AutoRound")
            errs[name] = rel
        return errs, ", ".join(sorted(kernels))


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


@contextlib.contextmanager
def _library_log(path: Path, progress: bool) -> Iterator[None]:
    """AutoRound's log (its own console handler, per-block losses) into the run's logs/;
    its per-block progress bar stays on the console when `progress` is on."""
    import auto_round  # noqa: F401  (its first import installs the console handler)

    log = io.StringIO()
    handlers = [
        h for h in logging.getLogger("autoround").handlers if isinstance(h, logging.StreamHandler)
    ]
    streams = [h.setStream(log) for h in handlers]
    err = contextlib.nullcontext() if progress else contextlib.redirect_stderr(log)
    try:
        with contextlib.redirect_stdout(log), err:
            yield
    finally:
        for h, s in zip(handlers, streams):
            h.setStream(s)
        atomic_write_text(path, log.getvalue())
