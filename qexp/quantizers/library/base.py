"""The base of every library back-end: a quantizer that runs a third-party library.

A back-end declares its library (`library = Library(import name, install command, label,
distributions, log name)`) and implements `run_library`. The base gives it, the same way
for all of them:

- `validate_environment()`: the library is importable, checked when the run is validated
  (before any model loads), one ConfigError naming the option and the install command;
- the library's console output and log files captured into `logs/<log_name>_<branch>.log`
  of the run dir (`capture_log`, with `route_log` for a library's own logging);
- read-back with a kernel check (`read_back`): each quantized module's de-quantized weight
  must reproduce the library's own forward on a seeded probe input (relative error within
  `kernel_tol`, recorded) before it is copied into the full-precision model, so the evaluated
  model is the one the library would run; every parameter the library changed outside the
  quantized modules (AWQ rescales norms) is copied too;
- `save_artifact`: the library's native checkpoint under `quantized/<branch>/` of the run
  dir with `save_quantized=true`, written atomically;
- the `library`, `modules` and `kernel_vs_dequant_max_rel_err` entries of results.json's
  `quantization.<branch>`.

`CalibratedQuantizer` adds the calibration sequences (qexp/quantizers/calib.py) and a batch
size; `GPTQFamily` the keys GPTQ and AWQ libraries share; `ModuleQuantizer` is a
calibration-free library that encodes one linear layer at a time into a module with
`dequantize()` (hqq, sinq).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.io import atomic_dir, atomic_write_text
from qexp.core.plugin import StageResult, Subject
from qexp.quantizers.base import (
    Quantizer,
    check_group_size,
    model_widths,
    require_group_fit,
)
from qexp.quantizers.calib import Calibration


def relative_error(y: torch.Tensor, y_lib: torch.Tensor) -> float:
    """‖y − y_lib‖ / ‖y_lib‖."""
    return float((y - y_lib).norm() / y_lib.norm().clamp_min(1e-12))


@dataclass
class ReadBack:
    """One quantized module as the library left it: its de-quantized weight (candidates, for
    a library that may store it transposed) and the bias its forward adds."""

    name: str
    module: nn.Module
    weights: list[torch.Tensor]
    bias: Optional[torch.Tensor] = None
    input_dtype: Optional[torch.dtype] = None  # what the module's forward takes (its own)
    copy_bias: bool = True  # False: the model keeps its bias (the library's is the same)


@dataclass(frozen=True)
class Library:
    """The third-party library a back-end runs."""

    requires: str  # its import name (found without importing it)
    install: str  # how to install it: the one-line error when it is missing says this
    label: str  # its name in messages ("GPTQModel")
    distributions: tuple[str, ...] = ()  # whose versions results.json records (default: requires)
    log_name: Optional[str] = None  # its console output goes to logs/<log_name>_<branch>.log


@dataclass
class LibraryQuantizer(Quantizer):
    """A quantizer that runs a third-party library (its capabilities on the class)."""

    library: ClassVar[Library] = Library("", "", "")
    bits_allowed: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    per_channel: ClassVar[bool] = True  # group_size=-1 (one group per output row) allowed
    group_fit_why: ClassVar[str] = ""  # why a group must divide every input width
    # why `skip` must stay [lm_head] (the library picks the linears itself); None: any list
    fixed_skip: ClassVar[Optional[str]] = None

    name: str = "library"
    bits: int = 4
    group_size: int = 64
    kernel_tol: float = 1e-5
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, self.bits_allowed)
        check_group_size(self.group_size, per_channel=self.per_channel)
        check(self.kernel_tol > 0, "kernel_tol", self.kernel_tol, "a number > 0")
        if self.fixed_skip is not None:
            check(self.skip == ["lm_head"], "skip", self.skip, f"[lm_head] ({self.fixed_skip})")

    # ---- capabilities ------------------------------------------------------------------
    def validate_environment(self) -> None:
        """The library is importable (found without importing it), or one ConfigError naming
        this option and the install command."""
        if importlib.util.find_spec(self.library.requires) is None:
            allowed = f"another quantizer, or install: {self.library.install}"
            raise ConfigError("quantizer", self.name, allowed)

    def check_widths(self, widths: list[int]) -> None:
        """`group_size` divides every input width (the library refuses, or cannot load, a
        row a group splits)."""
        if self.group_size != -1:
            require_group_fit(
                widths, self.group_size, self.library.label, self.per_channel, self.group_fit_why
            )

    def library_info(self) -> dict:
        """The `library` entry of results.json: each distribution and its version."""
        names = self.library.distributions or (self.library.requires,)
        versions = [f"{d} {importlib.metadata.version(d)}" for d in names]
        return {"library": ", ".join(versions)}

    # ---- the stage ---------------------------------------------------------------------
    @torch.no_grad()
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        self.check_widths(model_widths(subject.model, self.skip))
        files = []
        if self.library.log_name is None:
            out = self.run_library(subject, ctx, io.StringIO())
        else:
            log_file = f"logs/{self.library.log_name}_{subject.branch}.log"
            with self.capture_log(ctx.run_dir / log_file, ctx) as log:
                out = self.run_library(subject, ctx, log)
            files.append(log_file)
        model, info = out if isinstance(out, tuple) else (subject.model, out)
        return StageResult(model, {**self.library_info(), **info}, files)

    def run_library(
        self, subject: Subject, ctx: RunContext, log: io.StringIO
    ) -> dict | tuple[nn.Module, dict]:
        """Quantize `subject.model` in place through the library (its console output goes to
        `log`); return what results.json records beside the library's version. A back-end
        whose evaluated model is the library's own (`plain_output = False`: its forward
        quantizes activations) returns (that model, the record)."""
        raise NotImplementedError

    # ---- shared steps ------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_log(self, path: Path, ctx: RunContext) -> Iterator[io.StringIO]:
        """The library's console output (and what `route_log` sends) into `path`, written
        when the block ends, however it ends."""
        log = io.StringIO()
        try:
            with (
                contextlib.redirect_stdout(log),
                self.route_stderr(log, ctx),
                self.route_log(log, path),
            ):
                yield log
        finally:
            atomic_write_text(path, log.getvalue())

    def route_stderr(self, log: io.StringIO, ctx: RunContext) -> contextlib.AbstractContextManager:
        """Where the library's stderr goes while it runs (its warnings and progress bars)."""
        return contextlib.redirect_stderr(log)

    def route_log(self, log: io.StringIO, path: Path) -> contextlib.AbstractContextManager:
        """Send the library's own logging (its handlers, its log files) into `log` or next to
        `path` (the run dir's logs/)."""
        return contextlib.nullcontext()

    def read_back(self, modules: Iterable[ReadBack], model: nn.Module) -> dict[str, float]:
        """Copy each module's de-quantized weight into `model` once the library's forward on
        a seeded probe input reproduced it (the best candidate); returns the relative error
        per module."""
        errs: dict[str, float] = {}
        gen = torch.Generator().manual_seed(0)
        for rb in modules:
            lin = model.get_submodule(rb.name)
            x = torch.randn(4, lin.in_features, generator=gen).to(lin.weight.device)
            y_lib = rb.module(x.to(rb.input_dtype or x.dtype)).float().reshape(4, -1)
            scored = []
            for w in rb.weights:
                if w.shape == lin.weight.shape:
                    y = torch.nn.functional.linear(x, w.to(x.device), rb.bias)
                    scored.append((relative_error(y, y_lib), w))
            if not scored:
                shape = tuple(rb.weights[0].shape)
                raise RuntimeError(f"{rb.name}: de-quantized shape {shape} does not fit")
            rel, best = min(scored, key=lambda t: t[0])
            self.copy_checked(lin, best, rb.bias if rb.copy_bias else None, rel, rb.name)
            errs[rb.name] = rel
        return errs

    def copy_checked(
        self, lin: nn.Linear, w: torch.Tensor, bias: Optional[torch.Tensor], rel: float, name: str
    ) -> None:
        """Copy a de-quantized weight (and bias) into `lin` if it matched the library's forward."""
        if not rel <= self.kernel_tol:
            raise RuntimeError(
                f"{name}: the de-quantized weight does not reproduce {self.library.label}'s "
                f"forward (relative error {rel:.3g} > kernel_tol {self.kernel_tol}); refusing "
                "to evaluate a different model"
            )
        lin.weight.copy_(w.to(lin.weight.dtype))
        if bias is not None:
            lin.bias.copy_(bias)

    def copy_rest(self, qmodel: nn.Module, model: nn.Module, quantized: Iterable[str]) -> None:
        """Copy every parameter outside the quantized modules; fail if nothing was quantized."""
        quantized = set(quantized)
        if not quantized:
            raise RuntimeError(f"{self.library.label} quantized no module; nothing to evaluate")
        own = dict(model.named_parameters())
        for name, p in qmodel.named_parameters():
            if name.rpartition(".")[0] not in quantized and name in own:
                own[name].copy_(p.to(own[name].dtype))

    @staticmethod
    def save_artifact(ctx: RunContext, branch: str, write: Callable[[Path], Any]) -> dict:
        """`write(dir)` the library's native checkpoint into quantized/<branch>/ (atomic)."""
        with atomic_dir(ctx.run_dir / "quantized" / branch) as out:
            write(out)
        return {"artifact": str(Path("quantized") / branch)}

    @staticmethod
    def kernel_info(errs: dict[str, float]) -> dict:
        """The modules read back and the worst kernel-vs-de-quantized relative error."""
        return {"modules": len(errs), "kernel_vs_dequant_max_rel_err": max(errs.values())}


@dataclass
class CalibratedQuantizer(LibraryQuantizer):
    """A library back-end that needs calibration data (GPTQ, AWQ, AutoRound)."""

    batch_size: int = 4
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")

    def calibration_sequences(self, subject: Subject, ctx: RunContext) -> list[list[int]]:
        """The calibration token sequences for this model and seed."""
        return self.calibration.sequences(subject.model, subject.tokenizer, ctx.seed)


@dataclass
class GPTQFamily(CalibratedQuantizer):
    """The keys GPTQ/AWQ libraries share: method, symmetric groups, act-order, dampening."""

    data_dependent: ClassVar[bool] = True
    saves_artifact: ClassVar[bool] = True

    method: str = "gptq"
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False  # act-order (GPTQ)
    damp: float = 0.01  # Hessian dampening (GPTQ), a fraction of the mean diagonal
    kernel_tol: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.damp < 1.0, "damp", self.damp, "a fraction in (0, 1)")


@dataclass
class ModuleQuantizer(LibraryQuantizer):
    """A calibration-free library that encodes each linear layer into one of its modules
    (with `dequantize()`), whose forward the read-back checks."""

    per_channel: ClassVar[bool] = False  # the library groups the flattened weight

    def library_module(self, name: str, lin: nn.Linear, notes: dict) -> nn.Module:
        """The library's quantized module for one linear layer (facts about it go into
        `notes`, recorded in results.json)."""
        raise NotImplementedError

    def notes(self) -> dict:
        """What results.json records of this library's run beyond bits and group size,
        before the first layer (filled in by `library_module`)."""
        return {}

    def run_library(self, subject: Subject, ctx: RunContext, log: io.StringIO) -> dict:
        model = subject.model
        gen = torch.Generator().manual_seed(ctx.seed)
        layers = list(self.quantized_linears(model))
        errs: dict[str, float] = {}
        notes = self.notes()
        for name, lin in tqdm(layers, desc=self.name, disable=not ctx.progress, leave=False):
            module = self.library_module(name, lin, notes)
            deq = module.dequantize()
            x = torch.randn(4, lin.in_features, generator=gen).to(lin.weight)
            ref = x @ deq.T + (lin.bias if lin.bias is not None else 0)
            errs[name] = relative_error(ref, module(x))
            self.copy_checked(lin, deq, None, errs[name], name)
            del module
        return {"bits": self.bits, "group_size": self.group_size, **notes, **self.kernel_info(errs)}
