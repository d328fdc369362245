"""The quantizer interface: Q, post-training quantization of a full-precision model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check
from qexp.core.geometry import linear_shapes
from qexp.core.plugin import Plugin, StageResult, Subject
from qexp.core.registry import build_option, options_where

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Quantizer(Plugin, ABC):
    """Quantizes a model; the result is evaluated like any other condition.

    `info` of the result (library and version, calibration, checks) goes to results.json
    `quantization.<branch>`.
    """

    group: ClassVar[str] = "quantizer"

    # whether `save_quantized=true` writes the library's native artifact to quantized/<branch>/
    saves_artifact: ClassVar[bool] = False
    # whether the result depends on calibration data, not on the weights alone (GPTQ, AWQ,
    # AutoRound): no exact boxes, and the matrix plan's `quantize_data_dependent` cost
    data_dependent: ClassVar[bool] = False
    # whether the quantized model has the input's parameters (de-quantized weights), so the
    # stage cache can store it; False for library modules such as bitsandbytes' Linear4bit
    plain_output: ClassVar[bool] = True
    # whether quantize() changes the model's own modules in place, so forward hooks on them
    # (a defense's online rotations) stay part of the quantized model
    keeps_hooks: ClassVar[bool] = False
    skip: Sequence[str]  # module-name substrings kept in full precision

    def quantized_linears(self, model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        """(name, module) of every linear layer this quantizer quantizes."""
        return target_linears(model, self.skip)

    def check_model(self, config: Any) -> None:
        widths = config_widths(config)
        if widths is not None:
            self.check_widths(widths)

    def check_widths(self, widths: list[int]) -> None:
        """Refuse linear input widths this quantizer cannot quantize (ConfigError); run
        on config.json before any weights load, and on the model at quantize time."""

    @abstractmethod
    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        """Return the quantized model (may modify `subject.model` in place)."""


@dataclass
class NoQuantizer(Quantizer):
    """`quantizer=none`: Q is the identity, so `*_q` equal their full-precision sources."""

    name: str = "none"
    identity: ClassVar[bool] = True
    keeps_hooks: ClassVar[bool] = True
    # nothing is quantized, but a defense acting on "the quantized linears" (noise, launder)
    # uses the usual scope: every linear layer but lm_head
    skip: ClassVar[tuple[str, ...]] = ("lm_head",)

    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        return StageResult(subject.model)


class BoxTarget(ABC):
    """A quantizer the gap attack can target: per-tensor boxes and the library's codes.

    `exact_boxes`: every weight inside its box keeps the tensor's codes (proved by the
    geometry); otherwise the boxes are a heuristic and the attack verifies with the library
    and pins every block whose codes changed (`block` weights along a row, independent).
    """

    exact_boxes: ClassVar[bool] = True
    name: str

    @abstractmethod
    def prepare(self, subject: Subject, ctx: RunContext) -> Boxes:
        """This target's boxes for the model about to be boxed (what they depend on beyond
        each tensor, such as a type mix or an importance matrix, fixed from it)."""


class Boxes(ABC):
    """A target's boxes for one model (`BoxTarget.prepare`): per-tensor boxes, codes and
    blocks; `assumes` says what the attack assumes of the user's quantization run."""

    def __init__(self, target: BoxTarget, assumes: dict | None = None) -> None:
        self.target, self.assumes = target, assumes or {}
        self.name, self.exact = target.name, target.exact_boxes

    @abstractmethod
    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[lo, hi]` (float64) per weight of parameter `name`."""

    @abstractmethod
    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """What the library stores for parameter `name` (one row of bytes per weight row
        for block formats)."""

    def tensor_block(self, name: str) -> int:
        """Weights per independently encoded block along a row of `name`."""
        raise NotImplementedError(f"{self.name}: boxes are exact, no block verification")

    def coupled_blocks(self, name: str, bad: torch.Tensor) -> torch.Tensor:
        """The blocks ([out, blocks] bool) to reset when the reset `bad` blocks still differ
        because the library couples them: by default the whole tensor."""
        return torch.ones_like(bad)


class TensorBoxTarget(BoxTarget):
    """A box target whose boxes need nothing but the tensor: the target is its own boxes."""

    def prepare(self, subject: Subject, ctx: RunContext) -> Boxes:
        return TensorBoxes(self)

    @abstractmethod
    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[lo, hi]` (float64) per weight of parameter `name`."""

    @abstractmethod
    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """What the library stores for parameter `name`."""

    def tensor_block(self, name: str) -> int:
        """Weights per independently encoded block along a row of `name`."""
        raise NotImplementedError(f"{self.name}: boxes are exact, no block verification")

    def coupled_blocks(self, name: str, bad: torch.Tensor) -> torch.Tensor:
        """The blocks to reset when reset blocks still differ (default: the whole tensor)."""
        return torch.ones_like(bad)


class TensorBoxes(Boxes):
    """The boxes of a `TensorBoxTarget`: its own per-tensor methods."""

    target: TensorBoxTarget

    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target.tensor_box(name, w)

    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return self.target.tensor_codes(name, w)

    def tensor_block(self, name: str) -> int:
        return self.target.tensor_block(name)

    def coupled_blocks(self, name: str, bad: torch.Tensor) -> torch.Tensor:
        return self.target.coupled_blocks(name, bad)


class GridQuantizer(Quantizer, TensorBoxTarget):
    """A quantizer with a deterministic grid: per-weight codes and preserving intervals.

    Every method takes a [out, in] weight in the dtype the model is loaded in and follows
    what the library does with that dtype on the user's path.
    """

    # whether `neighbours` is implemented (defense=quantguard needs it)
    has_neighbours: ClassVar[bool] = False

    def audit_default(self) -> bool:
        """Whether `qexp-audit`'s gap check targets this option by default (a deployment a
        user gets with one flag of a common loader)."""
        return False

    def library_input(self, w: torch.Tensor) -> torch.Tensor:
        """The values the library quantizes for this weight on the user's path (its input
        lattice: the weight itself, unless the library casts first)."""
        return w.detach().cpu()

    @abstractmethod
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """What the real library stores for a [out, in] weight (codes and scales, flattened)."""

    @abstractmethod
    def weight_codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer code of every weight (shape of `w`), read from what `codes` stores."""

    @abstractmethod
    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """The de-quantized [out, in] weight the library computes with (float32)."""

    def neighbours(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid points just below and above each weight's own (float32; the own point
        where the grid ends), with the block scales unchanged."""
        raise NotImplementedError(f"{self.name}: no neighbouring-grid-point geometry")

    @abstractmethod
    def intervals(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-weight `[lo, hi]` (float64) inside which `codes(w)` does not change."""

    def tensor_box(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`intervals`, with rounding ties pinned: a weight exactly on a rounding boundary
        (each library breaks ties its own way) may sit at the edge of the neighbouring
        code's interval, found by the library's code at the box's centre."""
        lo, hi = self.intervals(w)
        return pin_ties(w, lo, hi, self.fake_quant)

    def tensor_codes(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return self.codes(w)


def pin_ties(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fake_quant
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes `[lo, hi]` with every weight whose de-quantized value differs from its box
    centre's (a rounding tie the library breaks its own way) pinned to itself."""
    centre = torch.where(lo < hi, (lo + hi) / 2, w.double()).to(w.dtype)
    tie = fake_quant(centre) != fake_quant(w)
    return torch.where(tie, w.double(), lo), torch.where(tie, w.double(), hi)


def grid_options() -> list[str]:
    """The quantizer options with a deterministic grid (preserving intervals)."""
    return options_where("quantizer", lambda cls: issubclass(cls, GridQuantizer))


def target_options() -> list[str]:
    """The quantizer options the gap attack can target."""
    return options_where("quantizer", lambda cls: issubclass(cls, BoxTarget))


def target_quantizer(name: str, key: str) -> BoxTarget:
    """Quantizer option `name`, which must be a gap-attack target; errors name `key`."""
    targets = target_options()
    check(name in targets, key, name, "quantizers with boxes: " + ", ".join(targets))
    return build_option("quantizer", name, key)


def audit_targets() -> list[str]:
    """The grid quantizer options `qexp-audit`'s gap check targets by default."""
    return [n for n in grid_options() if build_option("quantizer", n, "quantizer").audit_default()]


def grid_quantizer(name: str, key: str) -> GridQuantizer:
    """Quantizer option `name`, which must be a grid quantizer; errors name `key`."""
    grids = grid_options()
    check(name in grids, key, name, "grid quantizers: " + ", ".join(grids))
    return build_option("quantizer", name, key)


def target_linears(model: nn.Module, skip: Sequence[str]) -> Iterator[tuple[str, nn.Linear]]:
    """The model's nn.Linear modules, minus those whose name contains a `skip` entry."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(s in name for s in skip):
            yield name, module


GROUP_SIZES = (32, 64, 128, 256)


def check_group_size(group_size: int, per_channel: bool) -> None:
    """`group_size` is one of GROUP_SIZES, or -1 (per output channel) where allowed."""
    ok = group_size in GROUP_SIZES or (per_channel and group_size == -1)
    allowed = ("-1 (per output channel) or one of " if per_channel else "one of ") + ", ".join(
        map(str, GROUP_SIZES)
    )
    check(ok, "group_size", group_size, allowed)


def model_widths(model: PreTrainedModel, skip: Sequence[str]) -> list[int]:
    """Input widths of the linears a quantizer with `skip` quantizes."""
    return sorted({m.in_features for _, m in target_linears(model, skip)})


def config_widths(config: Any) -> list[int] | None:
    """Input widths of the decoder linears, from config.json (None if it lacks the keys)."""
    shapes = linear_shapes(config)
    return None if shapes is None else sorted({i for _, i in shapes.values()})


def require_group_fit(
    widths: Sequence[int], group_size: int, who: str, per_channel: bool, why: str = ""
) -> None:
    """ConfigError naming `quantizer.group_size` unless it divides every input width."""
    bad, ok = group_fit(widths, group_size)
    if bad:
        alts = f"one of {ok or [-1]}" + (" or -1" if per_channel else "")
        raise ConfigError(
            "quantizer.group_size",
            group_size,
            f"a divisor of every input width {list(widths)} for {who}: {alts}{why}",
        )


def group_fit(widths: Sequence[int], group_size: int) -> tuple[list[int], list[int]]:
    """The widths `group_size` does not divide, and the GROUP_SIZES that divide them all."""
    bad = [w for w in widths if w % group_size]
    ok = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    return bad, ok
