"""defense=canonicalize: undo function-preserving reparameterizations before quantization.

Every transform `attack=encrypt` uses lives in a symmetry of the architecture; this defense
maps each symmetry orbit to one canonical, balanced representative, exactly (float64), so
whatever key was applied, the result is the same model up to rounding:

- `vo`: per kv-head g with query heads h ∈ group(g), the product Σ = [W_o[:, C_h]]_h · W_v[R_g]
  (rank d) is invariant under W_v[R_g] ← A W_v[R_g], W_o[:, C_h] ← W_o[:, C_h] A⁻¹. With
  QR factors O = Q_o R_o, W_vᵀ = Q_v R_v and the SVD R_o R_vᵀ = U S Wᵀ, the balanced factors
  are O' = Q_o U S^½, W_v' = S^½ (Q_v W)ᵀ, i.e. A = S^½ Wᵀ R_v⁻ᵀ (v biases follow A).
  This removes mechanisms A and B and the V/O needles of C.
- `qk`: per kv-head, one scalar c (commutes with RoPE) so that the query rows' Frobenius
  norm per query head equals the key rows' norm: removes the Q/K needles of C. Skipped for
  architectures with q/k norms (Qwen3), where the scale is already normalised away.
- `mlp`: per intermediate channel i, W_up[i] ← c_i W_up[i], W_down[:, i] ← W_down[:, i]/c_i
  with ‖W_up[i]‖ = ‖W_down[:, i]‖ afterwards (SwiGLU is linear in `up`): removes the
  optional MLP variant of A.
- `norm` (not in the default parts): per hidden channel j of each RMSNorm, γ_j ← c_j γ_j and
  the consumers' columns W[:, j] ← W[:, j] / c_j (q/k/v after `input_layernorm`, gate/up
  after `post_attention_layernorm`) with |γ_j| = ‖W[:, j]‖ afterwards: removes encrypt's
  norm-fed power-of-two anchors (`preset=exact`, sites attn_in and mlp_in).

Each part maps a whole orbit of its symmetry to one representative, so canonicalize ∘ T =
canonicalize for every T in the group the parts generate (docs/defenses.md#canonicalize).

Function preservation is measured by the pipeline like encrypt's (probe logits before/after;
fp32 max |Δlogit| must stay within `tolerance`) and reported in `defense_stats`.

The parts act on one decoder layer's tensors by role (`canonicalize_tensors`, in place, in row
chunks of at most CHUNK elements in float64), so the in-memory defense and the streaming
`qexp-canonicalize` (qexp/tools/canonicalize.py) run the same arithmetic and write the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

import torch
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import check, check_choice
from qexp.core.geometry import Geometry, geometry, parse_name, parse_norm_name
from qexp.core.plugin import StageResult, Subject
from qexp.defenses.base import Defense
from qexp.quantizers.base import Quantizer

PARTS = ("vo", "qk", "mlp", "norm")
DEFAULT_PARTS = ("vo", "qk", "mlp")
NORM_ROUNDS, NORM_TOL = 200, 1e-6  # with `norm`: rounds to the joint fixed point
CHUNK = 1 << 18  # elements per float64 row chunk (2 MB: cached, and below malloc's mmap size)
# the tensor roles (qexp.core.geometry) each part reads and rewrites
ROLES = {
    "vo": ("v_weight", "v_bias", "o_weight"),
    "qk": ("q_weight", "q_bias", "k_weight", "k_bias"),
    "mlp": ("up_weight", "up_bias", "down_weight"),
    "norm": (
        "input_norm",
        "post_norm",
        "q_weight",
        "k_weight",
        "v_weight",
        "gate_weight",
        "up_weight",
    ),
}


def gram_r(gram: torch.Tensor) -> torch.Tensor:
    """R (upper, positive diagonal) with RᵀR = gram, for a batch [n, d, d] of Gram matrices:
    the R of a QR of the tall matrix whose Gram it is, up to row signs, from a Cholesky
    factorization (a tenth of a Householder QR's time at [16384, 128]); a rank-deficient
    Gram falls back to the QR of its square root."""
    r, info = torch.linalg.cholesky_ex(gram, upper=True)
    for i in torch.nonzero(info).reshape(-1).tolist():
        e, v = torch.linalg.eigh(gram[i])
        r[i] = torch.linalg.qr(e.clamp_min(0).sqrt()[:, None] * v.T).R
    return r


def balance_vo(wv: torch.Tensor, wo_heads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A and A⁻¹ that balance one kv-head: W_v [d, in] and its query heads' W_o [out, d]."""
    o = torch.cat(wo_heads, dim=0)  # [rep * out, d]
    # o = Q_o R_o, wv.T = Q_v R_v; A does not depend on the R factors' row signs
    r_o, r_v = gram_r(torch.stack([o.T @ o, wv @ wv.T]))
    u, s, wt = torch.linalg.svd(r_o @ r_v.T)
    # M's left singular vectors Q_o u = o R_o⁻¹ u: fix each sign basis-independently
    left = o @ torch.linalg.solve_triangular(r_o, u, upper=True)
    sign = torch.sign(left[left.abs().argmax(0), torch.arange(left.shape[1])])
    wt = wt * sign[:, None]
    half = s.sqrt()
    a = (half[:, None] * wt) @ torch.linalg.inv(r_v.T)
    a_inv = r_v.T @ (wt.T / half[None, :])
    return a, a_inv


def roles(parts: list[str] | frozenset[str], geo: Geometry) -> frozenset[str]:
    """The tensor roles the configured parts read and rewrite (qk: none with q/k norms)."""
    out: set[str] = set()
    for p in parts:
        if p != "qk" or not geo.qk_norm:
            out.update(ROLES[p])
    return frozenset(out)


def _rows(w: torch.Tensor) -> tuple[range, int]:
    """Row offsets of CHUNK-element float64 chunks of a 1-D or 2-D tensor."""
    step = max(1, CHUNK // max(1, w.shape[-1] if w.dim() > 1 else 1))
    return range(0, w.shape[0], step), step


def scale_rows(w: torch.Tensor, s: torch.Tensor) -> None:
    """w[i] ← w[i] · s[i] in place (float64 products, rounded once to w's dtype)."""
    rows, step = _rows(w)
    for r in rows:
        part = w[r : r + step]
        sr = s[r : r + step]
        part.copy_((part.double() * (sr[:, None] if w.dim() > 1 else sr)).to(w.dtype))


def scale_cols(w: torch.Tensor, s: torch.Tensor) -> None:
    """w[:, j] ← w[:, j] · s[j] in place (float64 products, rounded once to w's dtype)."""
    rows, step = _rows(w)
    for r in rows:
        part = w[r : r + step]
        part.copy_((part.double() * s[None, :]).to(w.dtype))


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """‖w[i]‖ per row, float64."""
    rows, step = _rows(w)
    return torch.cat([w[r : r + step].double().norm(dim=1) for r in rows])


def col_sq(w: torch.Tensor) -> torch.Tensor:
    """Σ_i w[i, j]² per column, float64 (summed chunk by chunk, in row order)."""
    rows, step = _rows(w)
    out = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    for r in rows:
        out += w[r : r + step].double().square().sum(0)
    return out


def canonicalize_tensors(
    t: dict[str, torch.Tensor], geo: Geometry, parts: list[str]
) -> list[float]:
    """Every configured part on one decoder layer's tensors (role -> tensor, rewritten in
    place); returns the V/O condition numbers of A. vo, qk and mlp act on disjoint tensors (one
    pass); `norm` scales the columns whose norms the others balance (and they its), so with it
    the parts repeat to a joint fixed point."""
    norms = [t[r] for r in ("input_norm", "post_norm")] if "norm" in parts else []
    cond: list[float] = []
    for _ in range(NORM_ROUNDS if norms else 1):
        before = [n.double().clone() for n in norms]
        if norms:
            _norm(t["input_norm"], [t["q_weight"], t["k_weight"], t["v_weight"]])
            _norm(t["post_norm"], [t["gate_weight"], t["up_weight"]])
        cond = _vo(t, geo) if "vo" in parts else []
        if "qk" in parts and not geo.qk_norm:
            _qk(t, geo)
        if "mlp" in parts:
            _mlp(t)
        moved = max(
            (
                float(((n.double() - b).abs() / b.abs().clamp_min(1e-30)).max())
                for n, b in zip(norms, before)
            ),
            default=0.0,
        )
        if moved < NORM_TOL:
            break
    return cond


def _norm(gamma: torch.Tensor, consumers: list[torch.Tensor]) -> None:
    """Balance an RMSNorm weight γ against its consumers' input columns: |γ_j| = ‖W[:, j]‖."""
    g = gamma.double()
    cols = sum(col_sq(w) for w in consumers).sqrt()
    ok = (g != 0) & (cols > 0)
    c = torch.where(ok, (cols / g.abs().where(ok, 1.0)).sqrt(), 1.0)
    gamma.copy_((g * c).to(gamma.dtype))
    for w in consumers:
        scale_cols(w, 1.0 / c)


def _vo(t: dict[str, torch.Tensor], geo: Geometry) -> list[float]:
    """Per kv-head: W_v[R_g] ← A W_v[R_g], W_o[:, C_h] ← W_o[:, C_h] A⁻¹ (v bias follows A)."""
    d, rep = geo.head_dim, geo.group
    wv, wo, bv = t["v_weight"], t["o_weight"], t.get("v_bias")
    conds = []
    for g in range(geo.num_kv_heads):
        rows = slice(g * d, (g + 1) * d)
        heads = [slice(h * d, (h + 1) * d) for h in range(g * rep, (g + 1) * rep)]
        v = wv[rows].double()
        o = [wo[:, c].double() for c in heads]
        a, a_inv = balance_vo(v, o)
        conds.append(float(torch.linalg.cond(a)))
        wv[rows] = (a @ v).to(wv.dtype)
        if bv is not None:
            bv[rows] = (a @ bv[rows].double()).to(bv.dtype)
        for c, oc in zip(heads, o):
            wo[:, c] = (oc @ a_inv).to(wo.dtype)
    return conds


def _qk(t: dict[str, torch.Tensor], geo: Geometry) -> None:
    """Per kv-head one scalar c: query rows ÷ c, key rows × c, equal norms per query head."""
    d, rep = geo.head_dim, geo.group
    nq = row_norms(t["q_weight"]).square().reshape(geo.num_kv_heads, -1).sum(1).sqrt()
    nk = row_norms(t["k_weight"]).square().reshape(geo.num_kv_heads, -1).sum(1).sqrt()
    c = (nq / rep**0.5 / nk).sqrt()
    cq, ck = (1.0 / c).repeat_interleave(rep * d), c.repeat_interleave(d)
    for role, s in (("q", cq), ("k", ck)):
        scale_rows(t[f"{role}_weight"], s)
        if t.get(f"{role}_bias") is not None:
            scale_rows(t[f"{role}_bias"], s)


def _mlp(t: dict[str, torch.Tensor]) -> None:
    """Per intermediate channel: ‖W_up[i]‖ = ‖W_down[:, i]‖ (SwiGLU is linear in up)."""
    c = (col_sq(t["down_weight"]).sqrt() / row_norms(t["up_weight"])).sqrt()
    scale_rows(t["up_weight"], c)
    if t.get("up_bias") is not None:
        scale_rows(t["up_bias"], c)
    scale_cols(t["down_weight"], 1.0 / c)


def layer_tensors(layer: torch.nn.Module, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    """A decoder layer's parameters by role (the tensors themselves, changed in place), roles
    named as in a checkpoint (`parse_name`, `parse_norm_name`)."""
    out = {}
    for name, p in layer.named_parameters():
        parsed = parse_name(f"layers.0.{name}") or parse_norm_name(f"layers.0.{name}")
        if parsed is not None and parsed[1] in wanted:
            out[parsed[1]] = p.data
    return out


@dataclass
class Canonicalize(Defense):
    """Map V/O, Q/K and MLP symmetries to balanced representatives (exact in float64)."""

    name: str = "canonicalize"
    parts: List[str] = field(default_factory=lambda: list(DEFAULT_PARTS))
    tolerance: float = 1e-2
    check_preservation: bool = True

    preserves_function: ClassVar[bool] = True
    surface: ClassVar[Optional[str]] = "canonical"

    def __post_init__(self) -> None:
        check(len(self.parts) > 0, "parts", self.parts, "a non-empty subset of " + ", ".join(PARTS))
        for p in self.parts:
            check_choice("parts", p, PARTS)
        check(self.tolerance > 0, "tolerance", self.tolerance, "a number > 0")

    def check_model(self, config: Any) -> None:
        geometry(config)  # a supported architecture

    def preservation_tolerance(self) -> Optional[float]:
        return self.tolerance if self.check_preservation else None

    @torch.no_grad()
    def apply(self, subject: Subject, quantizer: Quantizer, ctx: RunContext) -> StageResult:
        model = subject.model
        geo = geometry(model.config)
        stats = {"parts": list(self.parts), "layers": geo.num_layers}
        cond = []
        layers = model.model.layers
        for layer in tqdm(layers, "canonicalize", disable=not ctx.progress, leave=False):
            cond += self.canonicalize(layer_tensors(layer, roles(self.parts, geo)), geo)
        if cond:
            stats["vo_max_condition_of_A"] = max(cond)
        if "qk" in self.parts and geo.qk_norm:
            stats["qk"] = "skipped: q/k norms remove per-head scales"
        return StageResult(model, stats)

    def canonicalize(self, tensors: dict[str, torch.Tensor], geo: Geometry) -> list[float]:
        """One layer's tensors by role (`roles(parts, geo)`) to canonical form, in place;
        the V/O condition numbers of A."""
        return canonicalize_tensors(tensors, geo, self.parts)

    def symmetries(self) -> frozenset[str]:
        """The configured parts: the symmetries whose orbits map to one representative."""
        return frozenset(self.parts)

    @torch.no_grad()
    def canonicalize_layer(self, layer: torch.nn.Module, config: Any) -> None:
        """One decoder layer to its canonical form, in place."""
        geo = geometry(config)
        self.canonicalize(layer_tensors(layer, roles(self.parts, geo)), geo)
