"""defense=quantguard: learned rounding before quantization ("Breaking the Rounding Trap";
EFRAP's error-guided rounding flip is the closest public design).

For every linear weight the configured grid quantizer quantizes (bnb int8/nf4/fp4, RTN),
each weight chooses between its own grid point ŵ and the neighbouring one on its side
(`quantizer.neighbours`, block scales unchanged): W(h) = ŵ + h ⊙ (ŵ_other − ŵ), with
h = clamp(1.2 σ(v) − 0.1, 0, 1) (AdaRound's rectified sigmoid), initialised at the weight's
own position, h₀ = |w − ŵ| / |ŵ_other − ŵ| (so W(h₀) = w). Per layer, on inputs X captured
from the full-precision model on calibration sequences, Adam minimises

    ‖X (W(h) − W)ᵀ‖² / ‖X Wᵀ‖²                       output reconstruction vs full precision
  + λ_reg  · mean(1 − |2h − 1|^β)                      binarisation, β annealed 20 → 2
  − λ_rev  · mean(relu(h₀ − τ) / (0.5 − τ) · h)       error-guided rounding reversal
  + λ_dist · mean(h ⊙ (ŵ_other − ŵ) − (w − ŵ))² / s²  distance to the original weight

The reversal term rewards flipping weights whose rounding is a near tie (h₀ > τ), which is
where a quantization-gap attack's projected repair leaves its weights (box edges). The
layer-wise reconstruction stands in for the KL between full-precision and quantized model
outputs (a per-step full forward pass is too slow on CPU); the KL is measured once at the
end instead and reported. Finally the chosen grid points are written as the full-precision
weights (scale-setting weights untouched), so the *stock* quantizer reproduces the learned
rounding exactly; this is checked with the library (`quantizer.fake_quant`) and a mismatch
stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check
from qexp.core.plugin import StageResult, Subject
from qexp.core.registry import options_where
from qexp.defenses.base import Defense
from qexp.quantizers.base import GridQuantizer, Quantizer
from qexp.quantizers.calib import Calibration

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _has_neighbours(cls: type) -> bool:
    return issubclass(cls, GridQuantizer) and cls.has_neighbours


def _require_supported(q: Quantizer) -> None:
    if not _has_neighbours(type(q)):
        usable = options_where("quantizer", _has_neighbours)
        raise ConfigError(
            "quantizer",
            q.name,
            "with defense=quantguard, a grid quantizer with neighbouring grid points: "
            + ", ".join(usable),
        )


@torch.no_grad()
def _logits_quantized(model: PreTrainedModel, layers: list, q: GridQuantizer, ids) -> torch.Tensor:
    """Logits with every target weight replaced by its de-quantized value (then restored)."""
    saved = [m.weight.detach().clone() for _, m in layers]
    for _, m in layers:
        m.weight.copy_(q.fake_quant(m.weight).to(m.weight.dtype))
    out = model(input_ids=ids).logits.float()
    for (_, m), w in zip(layers, saved):
        m.weight.copy_(w)
    return out


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float(F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).mean())


@dataclass
class QuantGuard(Defense):
    """Learned rounding towards the configured quantizer's neighbouring grid points."""

    name: str = "quantguard"
    steps: int = 80
    lr: float = 1e-2
    lambda_reg: float = 0.01
    lambda_rev: float = 0.01
    lambda_dist: float = 0.0
    tau: float = 0.4
    calib_samples: int = 8
    calib_seq_len: int = 64
    warmup: float = 0.2

    surface: ClassVar[Optional[str]] = "ties"

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        for k in ("lambda_reg", "lambda_rev", "lambda_dist"):
            check(getattr(self, k) >= 0, k, getattr(self, k), "a number >= 0")
        check(0 <= self.tau < 0.5, "tau", self.tau, "a fraction in [0, 0.5)")
        check(0 <= self.warmup < 1, "warmup", self.warmup, "a fraction in [0, 1)")
        check(self.calib_samples >= 1, "calib_samples", self.calib_samples, "an integer >= 1")
        check(self.calib_seq_len >= 8, "calib_seq_len", self.calib_seq_len, "an integer >= 8")

    def tie_threshold(self) -> float:
        """τ: weights whose rounding error exceeds τ of the step are near ties."""
        return self.tau

    def check_spec(self, spec) -> None:
        """quantguard needs a quantizer with neighbouring-grid-point geometry."""
        _require_supported(spec.quantizer)

    @torch.no_grad()
    def _inputs(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, names: list[str], seed: int
    ) -> dict:
        """Each target linear's inputs on the calibration sequences (full precision)."""
        seqs = Calibration("self", samples=self.calib_samples, seq_len=self.calib_seq_len)
        ids = torch.tensor(seqs.sequences(model, tok, seed))
        xs: dict[str, torch.Tensor] = {}
        hooks = [
            model.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: xs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).float())
            )
            for n in names
        ]
        try:
            model(input_ids=ids.to(next(model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
        return xs

    def _learn(self, w: torch.Tensor, x: torch.Tensor, q: GridQuantizer) -> tuple:
        """Chosen weights (grid points), the flip mask and the movable mask of one layer."""
        deq = q.fake_quant(w)
        down, up = q.neighbours(w)
        lo, hi = q.intervals(w)
        movable = lo < hi
        other = torch.where(w >= deq, up, down)
        delta = other - deq
        choice = movable & (delta != 0)
        h0 = torch.where(choice, (w - deq).abs() / delta.abs().clamp_min(1e-30), 0.0)
        h0 = h0.clamp(0, 0.999)
        v = torch.logit(((h0 + 0.1) / 1.2).clamp(1e-4, 1 - 1e-4)).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.lr)
        ref = x @ w.T
        denom = ref.pow(2).sum().clamp_min(1e-30)
        rev_w = torch.relu(h0 - self.tau) / (0.5 - self.tau)
        step = delta.abs().clamp_min(1e-12)
        start = int(self.warmup * self.steps)
        for t in range(self.steps):
            h = torch.clamp(1.2 * torch.sigmoid(v) - 0.1, 0, 1) * choice
            wq = deq + h * delta
            loss = (x @ wq.T - ref).pow(2).sum() / denom
            if t >= start:
                beta = 20 + (2 - 20) * (t - start) / max(1, self.steps - start - 1)
                loss = loss + self.lambda_reg * (1 - (2 * h - 1).abs().pow(beta))[choice].mean()
            loss = loss - self.lambda_rev * (rev_w * h)[choice].mean()
            if self.lambda_dist:
                dist = ((wq - w) / step).pow(2)[choice].mean()
                loss = loss + self.lambda_dist * dist
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            h = torch.clamp(1.2 * torch.sigmoid(v) - 0.1, 0, 1) * choice
            flip = choice & (h >= 0.5)
        return flip, choice, deq, other

    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        model, tok = subject.model, subject.tokenizer
        _require_supported(quantizer)
        layers = list(quantizer.quantized_linears(model))
        xs = self._inputs(model, tok, [n for n, _ in layers], ctx.seed)
        probe = torch.tensor(
            Calibration("self", samples=4, seq_len=self.calib_seq_len).sequences(
                model, tok, ctx.seed + 1
            )
        )
        with torch.no_grad():
            ref_logits = model(input_ids=probe).logits.float()
        kl_before = _kl(ref_logits, _logits_quantized(model, layers, quantizer, probe))
        flips = choices = 0
        near_ties = flipped_ties = 0
        for name, lin in tqdm(layers, desc="quantguard", disable=not ctx.progress, leave=False):
            w = lin.weight.detach().float().cpu()
            flip, choice, deq, other = self._learn(w, xs.pop(name), quantizer)
            new = torch.where(flip, other, w)  # the others stay where they are (own code)
            if not torch.equal(quantizer.fake_quant(new), torch.where(flip, other, deq)):
                raise RuntimeError(
                    f"quantguard: {name}: the stock quantizer does not "
                    "reproduce the learned rounding"
                )
            with torch.no_grad():
                lin.weight.copy_(new.to(lin.weight.dtype))
            flips += int(flip.sum())
            choices += int(choice.sum())
            tie = choice & ((w - deq).abs() > self.tau * (other - deq).abs())
            near_ties += int(tie.sum())
            flipped_ties += int((flip & tie).sum())
        kl_after = _kl(ref_logits, _logits_quantized(model, layers, quantizer, probe))
        stats = {
            "layers": len(layers),
            "flipped_fraction": flips / max(1, choices),
            "near_tie_fraction": near_ties / max(1, choices),
            "flipped_fraction_of_near_ties": flipped_ties / max(1, near_ties),
            "kl_fp_vs_quantized_stock_rounding": kl_before,
            "kl_fp_vs_quantized_learned_rounding": kl_after,
        }
        return StageResult(model, stats)
