"""defense=noise: Gaussian noise before quantization, σ fixed or from the quantizer's geometry.

Variants of the interval-calibrated noise paper and ELQ's noise defense, one plugin:

- `sigma=fixed` (σ = 1e-3, ELQ's heuristic) or `sigma=<number>`: that σ for every tensor.
- `sigma=global`: σ̂ = `global_stat` (default median) over tensors of h_ℓ.
- `sigma=per_layer`: σ_ℓ = h_ℓ for each quantized weight tensor.

h_ℓ is the `stat` (p25 / p50 / p75, default median) of the half-widths h = (hi - lo) / 2 of
the configured quantizer's preserving intervals (`GridQuantizer.intervals`, docs/design.md §5)
over the tensor's *non-pinned* weights (hi > lo; the pinned ones set a block's scale). Percentiles
interpolate linearly (numpy's default), so the median of an even count is the mean of the
two middle values. Only the weights the quantizer quantizes (its linear layers minus `skip`)
have an h_ℓ; with `scope=all` every other float parameter gets σ̂ (or the fixed σ).

Noise is drawn in float32 on the CPU from the generator of `ctx.seed_everything()`, tensor
by tensor in module order, added in float32 and stored in the parameter's dtype.

What the noise did, measured with the real library (`defense_stats`, on the full tensors):
for every quantized weight tensor the per-weight integer codes the library stores
(`quantizer.weight_codes`) before and after the noise, and `fraction_changed`, the fraction of
non-pinned weights (pinned: lo == hi on the clean weights) whose code changed. A changed
block scale alone (same code, slightly different value) does not count; a code that moves
because the noise on a scale-setting weight moved the grid does. Recorded next to it:
`fraction_changed_intervals` (the interval route: the noisy weight left its clean [lo, hi],
which ignores grid moves) and `theory_uniform` (mean over weights of
`expected_flip_fraction(σ / h_i)`, the closed form for weights placed uniformly inside their
intervals).

Diagnostics in the run dir (the original branch; `_<branch>` suffix for another):
`noise_halfwidths.png` (histogram of h_ℓ, σ̂ marked) and `noise_scurve.{json,png}`: fraction
of changed codes against σ (log grid 1e-6..1e-2, plus σ_ℓ = h_ℓ per layer and σ̂), same three
measures, on up to `diag_rows` random rows per tensor (each row set quantized as a matrix of
its own: the same codes as in the full tensor for qexp's quantizers, whose blocks never span
rows when in_features is a multiple of the block).
The S-curve uses one standard-normal draw per weight scaled by each σ, so it is monotone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.io import atomic_write_json
from qexp.core.plots import new_figure, save_png
from qexp.core.plugin import StageResult, Subject
from qexp.defenses.base import Defense
from qexp.defenses.changes import ChangeCounter, Geometry, expected_flip_fraction, quantized_weights
from qexp.quantizers.base import GridQuantizer, Quantizer

SIGMA_SOURCES = ("fixed", "global", "per_layer")
STATS = {"p25": 25.0, "p50": 50.0, "p75": 75.0}
SCOPES = ("linear", "all")
ELQ_SIGMA = 1e-3  # Egashira et al. 2024: the fixed σ of ELQ's noise defense
SCURVE_SIGMAS = tuple(10.0 ** (-6 + k / 3) for k in range(13))  # 1e-6 .. 1e-2, 13 points


# ---------------------------------------------------------------- statistics


def percentile(values: torch.Tensor | list[float], stat: str) -> float:
    """p25 / p50 / p75 with linear interpolation (numpy's default)."""
    x = values.detach().double().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    return float(np.percentile(x, STATS[stat]))


# ---------------------------------------------------------------- the defense


@dataclass
class Noise(Defense):
    """Gaussian noise N(0, σ²) on the weights before quantization (σ per `sigma`)."""

    name: str = "noise"
    # fixed (1e-3, ELQ) | global (σ̂) | per_layer (σ_ℓ = h_ℓ) | a positive number (fixed σ)
    sigma: str = "per_layer"
    stat: str = "p50"  # h_ℓ: this percentile of a tensor's half-widths
    global_stat: str = "p50"  # σ̂: this percentile of the h_ℓ over tensors
    scope: str = "linear"  # linear: the quantizer's linear weights | all: every float param
    diagnostics: bool = True  # S-curve and half-width histogram in the run dir
    diag_rows: int = 64  # rows sampled per tensor for the S-curve; -1 = all rows

    surface: ClassVar[Optional[str]] = "noise"

    def __post_init__(self) -> None:
        allowed = "fixed (σ = 1e-3), global, per_layer, or a positive number (fixed σ)"
        if self.sigma not in SIGMA_SOURCES:
            try:
                value = float(self.sigma)
            except ValueError:
                raise ConfigError("sigma", self.sigma, allowed) from None
            check(math.isfinite(value) and value > 0, "sigma", self.sigma, allowed)
        check_choice("stat", self.stat, tuple(STATS))
        check_choice("global_stat", self.global_stat, tuple(STATS))
        check_choice("scope", self.scope, SCOPES)
        check(
            self.diag_rows == -1 or self.diag_rows >= 1,
            "diag_rows",
            self.diag_rows,
            "-1 (all rows) or an integer >= 1",
        )

    @property
    def source(self) -> str:
        """fixed, global or per_layer."""
        return self.sigma if self.sigma in SIGMA_SOURCES else "fixed"

    @property
    def fixed_value(self) -> float:
        """The fixed σ (ELQ's 1e-3 for `sigma=fixed`)."""
        return ELQ_SIGMA if self.sigma == "fixed" else float(self.sigma)

    def check_spec(self, spec: Any) -> None:
        """Cross-group check run by config.validate, before any model is loaded."""
        self.check_quantizer(spec.quantizer)

    def check_quantizer(self, quantizer: Quantizer) -> None:
        """global / per_layer need preserving intervals: a GridQuantizer (rtn, bnb, gguf)."""
        if self.source != "fixed" and not isinstance(quantizer, GridQuantizer):
            raise ConfigError(
                "defense.sigma",
                self.sigma,
                "fixed or a positive number with "
                f"quantizer={quantizer.name} (no preserving intervals); "
                "global and per_layer need a grid quantizer (rtn*, bnb_*, gguf_*)",
            )

    def _sigmas(
        self, lin: dict[str, nn.Parameter], quantizer: Quantizer, progress: bool = False
    ) -> tuple[dict[str, float], Optional[float], float]:
        """h_ℓ per quantized weight tensor, σ̂ (None without intervals) and the global σ."""
        h_l: dict[str, float] = {}
        for name, p in tqdm(lin.items(), "noise: half-widths", disable=not progress):
            h = Geometry.of(quantizer, p).half_widths
            if h.numel():
                h_l[name] = percentile(h, self.stat)
        sigma_hat = percentile(list(h_l.values()), self.global_stat) if h_l else None
        if self.source != "fixed" and sigma_hat is None:
            raise ValueError(
                f"defense.sigma={self.sigma}: no quantized weight with a non-pinned weight "
                f"(quantizer={quantizer.name} targets {len(lin)} tensors)"
            )
        return h_l, sigma_hat, self.fixed_value if self.source == "fixed" else sigma_hat

    @torch.no_grad()
    def noise_sigmas(self, model: nn.Module, quantizer: Quantizer) -> dict[str, float]:
        """σ per quantized weight (`<module>.weight`) as `apply` would draw it."""
        self.check_quantizer(quantizer)
        grid = isinstance(quantizer, GridQuantizer)
        lin = dict(quantized_weights(model, quantizer))
        h_l, _, sigma_global = self._sigmas(lin if grid else {}, quantizer)
        if self.source != "per_layer":
            return dict.fromkeys(lin, sigma_global)
        return {n: h_l.get(n, sigma_global) for n in lin}

    @torch.no_grad()
    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        model = subject.model
        self.check_quantizer(quantizer)
        gen = ctx.seed_everything()
        diag_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        grid = isinstance(quantizer, GridQuantizer)
        lin = dict(quantized_weights(model, quantizer)) if grid else {}
        stats: dict[str, Any] = {
            "sigma_source": self.source,
            "quantizer": quantizer.name,
            "scope": self.scope,
            "stat": self.stat,
            "global_stat": self.global_stat,
            "noise_dtype": "float32",
        }

        # 1. h_ℓ of every quantized weight tensor (full tensors)
        h_l, sigma_hat, sigma_global = self._sigmas(lin, quantizer, ctx.progress)
        stats["sigma_global"] = sigma_global
        if sigma_hat is not None:
            stats["sigma_hat"] = sigma_hat

        def sigma_of(name: str) -> float:
            if self.source == "per_layer":
                return h_l.get(name, sigma_global)
            return sigma_global

        # 2. diagnostics on the clean weights (own generator: the applied noise is the same
        #    with or without them)
        files: list[str] = []
        if self.diagnostics and h_l:
            files = self._diagnostics(
                quantizer, lin, h_l, sigma_hat, subject.branch, ctx, diag_seed
            )
            stats["diagnostics"] = {"files": files, "rows_per_tensor": self.diag_rows}

        # 3. the noise, measured against the real library tensor by tensor
        if self.scope == "linear":
            targets = list(quantized_weights(model, quantizer))
        else:  # named_parameters lists a tied weight once, under its first name
            targets = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        lin_name = {id(p): n for n, p in lin.items()}
        counter = ChangeCounter()
        per_tensor: dict[str, dict] = {}
        n_noised = 0
        for name, p in tqdm(targets, "noise: apply", disable=not ctx.progress):
            key = lin_name.get(id(p))
            s = sigma_of(key) if key is not None else sigma_global
            geo = clean_codes = None
            if key is not None:
                geo = Geometry.of(quantizer, p)
                clean_codes = quantizer.weight_codes(p.detach().cpu())
            eps = torch.randn(p.shape, generator=gen, dtype=torch.float32) * s
            p.copy_((p.float() + eps.to(p.device)).to(p.dtype))
            n_noised += p.numel()
            row: dict[str, Any] = {"sigma": s}
            if key in h_l:
                row["h"] = h_l[key]
            if geo is not None:
                row.update(counter.add(quantizer, geo, clean_codes, p, s))
            per_tensor[key or name] = row
        stats["n_tensors"] = len(targets)
        stats["n_params_noised"] = n_noised
        stats["tensors"] = per_tensor
        summary = counter.summary()
        if summary:
            stats["fraction_changed"] = summary.pop("fraction_changed_library")
            stats["fraction_changed_method"] = "library"
            stats["fraction_changed_excludes"] = "pinned (scale-setting) weights"
            stats.update(summary)
            stats["theory_sigma_equals_h"] = expected_flip_fraction(1.0)
        return StageResult(model, stats, files)

    # ------------------------------------------------------------ diagnostics

    @staticmethod
    def _stem(base: str, branch: str) -> str:
        """`base` for the original branch, `base_<branch>` for another."""
        return base if branch == "original" else f"{base}_{branch}"

    def _diagnostics(
        self,
        quantizer: GridQuantizer,
        lin: dict[str, nn.Parameter],
        h_l: dict[str, float],
        sigma_hat: float,
        branch: str,
        ctx: RunContext,
        seed: int,
    ) -> list[str]:
        curve = scurve(
            quantizer,
            {n: lin[n] for n in h_l},
            h_l,
            sigma_hat,
            rows=self.diag_rows,
            generator=torch.Generator().manual_seed(seed),
            progress=ctx.progress,
            extra={"fixed": self.fixed_value} if self.source == "fixed" else None,
        )
        curve["quantizer"] = quantizer.name
        curve["stat"], curve["global_stat"] = self.stat, self.global_stat
        curve["h_l"] = h_l
        stem_s, stem_h = self._stem("noise_scurve", branch), self._stem("noise_halfwidths", branch)
        atomic_write_json(ctx.run_dir / f"{stem_s}.json", curve)
        plot_scurve(curve, ctx.run_dir / f"{stem_s}.png")
        plot_halfwidths(curve, ctx.run_dir / f"{stem_h}.png")
        return [f"{stem_s}.json", f"{stem_s}.png", f"{stem_h}.png"]


def scurve(
    quantizer: GridQuantizer,
    weights: dict[str, torch.Tensor],
    h_l: dict[str, float],
    sigma_hat: float,
    rows: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    sigmas: tuple[float, ...] = SCURVE_SIGMAS,
    extra: Optional[dict[str, float]] = None,
) -> dict:
    """Fraction of non-pinned weights whose code N(0, σ²) noise changes, against σ.

    Points: every σ in `sigmas`, then `per_layer` (σ_ℓ = h_ℓ), `global` (σ̂) and any `extra`
    named σ. Real library codes (`quantizer.weight_codes`), the interval route and the
    uniform-position theory (mean of `expected_flip_fraction(σ / h_i)`) side by side. Up to
    `rows` random rows per tensor (-1: all); one standard-normal draw per weight, scaled by
    every σ.
    """
    gen = generator or torch.Generator().manual_seed(0)
    named = {"per_layer": None, "global": sigma_hat, **(extra or {})}
    grid_c = [ChangeCounter() for _ in sigmas]
    named_c = {k: ChangeCounter() for k in named}
    n_rows = n_weights = 0
    for name, w in tqdm(weights.items(), "noise: S-curve", disable=not progress):
        w = w.detach().cpu()
        if rows != -1 and w.shape[0] > rows:
            idx = torch.sort(torch.randperm(w.shape[0], generator=gen)[:rows]).values
            w = w[idx]
        n_rows += w.shape[0]
        n_weights += w.numel()
        geo = Geometry.of(quantizer, w)
        clean = quantizer.weight_codes(w)
        z = torch.randn(w.shape, generator=gen, dtype=torch.float32)
        todo = [(c, s) for c, s in zip(grid_c, sigmas)]
        todo += [(named_c[k], h_l[name] if s is None else s) for k, s in named.items()]
        for counter, s in todo:
            noisy = (w.float() + z * s).to(w.dtype)
            counter.add(quantizer, geo, clean, noisy, s)

    def point(c: ChangeCounter, sigma: Optional[float]) -> dict:
        out = c.summary()
        out["sigma"] = sigma
        if "fraction_changed_library" in out:
            out["fraction_changed"] = out.pop("fraction_changed_library")
        return out

    points = [point(c, s) for c, s in zip(grid_c, sigmas)]
    h_sorted = sorted(h_l.values())
    return {
        "method": "library",
        "excludes": "pinned (scale-setting) weights",
        "rows_per_tensor": rows,
        "n_tensors": len(weights),
        "n_rows": n_rows,
        "n_weights": n_weights,
        "sigma_hat": sigma_hat,
        "grid": points,
        "points": {k: point(named_c[k], s) for k, s in named.items()},
        "theory_sigma_equals_h": expected_flip_fraction(1.0),
        "h_range": [h_sorted[0], h_sorted[-1]] if h_sorted else None,
    }


def plot_scurve(curve: dict, path: Path) -> Path:
    """Fraction of changed codes against σ (log x), with σ̂ and the σ_ℓ = h_ℓ point."""
    fig, ax = new_figure((7, 4.2))
    sig = [p["sigma"] for p in curve["grid"]]
    key = "fraction_changed" if curve["method"] == "library" else "fraction_changed_intervals"
    ax.plot(sig, [p[key] for p in curve["grid"]], "o-", label=f"measured ({curve['method']})")
    if key != "fraction_changed_intervals":
        ivl = [p["fraction_changed_intervals"] for p in curve["grid"]]
        ax.plot(sig, ivl, "x:", label="interval route")
    dense = np.logspace(math.log10(sig[0]), math.log10(sig[-1]), 200)
    ax.plot(
        dense,
        [expected_flip_fraction(s / curve["sigma_hat"]) for s in dense],
        "--",
        color="gray",
        linewidth=1,
        label="uniform theory, h = σ̂",
    )
    ax.axvline(curve["sigma_hat"], color="red", linewidth=1, label=f"σ̂ = {curve['sigma_hat']:.3g}")
    pl = curve["points"]["per_layer"]
    ax.plot(
        [curve["sigma_hat"]],
        [pl.get(key)],
        "s",
        color="black",
        label=f"σ_ℓ = h_ℓ per layer: {pl.get(key):.3f} (theory {pl['theory_uniform']:.3f})",
    )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("noise σ")
    ax.set_ylabel("fraction of codes changed")
    ax.set_title(f"Codes changed by Gaussian noise, quantizer={curve['quantizer']}")
    ax.legend(fontsize=8, loc="upper left")
    save_png(fig, path)
    return path


def plot_halfwidths(curve: dict, path: Path) -> Path:
    """Histogram of the per-tensor half-widths h_ℓ (log bins) with σ̂ marked."""
    from matplotlib.ticker import MaxNLocator

    h = np.asarray(sorted(curve["h_l"].values()))
    fig, ax = new_figure((7, 4))
    lo, hi = h.min(), h.max()
    bins = np.logspace(math.log10(lo) - 0.05, math.log10(hi) + 0.05, 30) if hi > lo else 10
    ax.hist(h, bins=bins, color="tab:blue", alpha=0.8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axvline(curve["sigma_hat"], color="red", label=f"σ̂ = {curve['sigma_hat']:.3g}")
    if hi > lo:
        ax.set_xscale("log")
    ax.set_xlabel(f"h_ℓ = {curve['stat']} half-width of a tensor")
    ax.set_ylabel("tensors")
    ax.set_title(
        f"Per-tensor half-widths ({len(h)} tensors, quantizer={curve['quantizer']}, "
        f"σ̂ = {curve['global_stat']} over tensors)"
    )
    ax.legend()
    save_png(fig, path)
    return path
