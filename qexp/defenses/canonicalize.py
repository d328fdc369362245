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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

import torch
from tqdm.auto import tqdm

from qexp.context import RunContext
from qexp.defenses.base import Defense
from qexp.errors import check, check_choice
from qexp.models.geometry import geometry
from qexp.plugin import StageResult, Subject
from qexp.quantizers.base import Quantizer

PARTS = ("vo", "qk", "mlp", "norm")
DEFAULT_PARTS = ("vo", "qk", "mlp")
NORM_ROUNDS, NORM_TOL = 200, 1e-6  # with `norm`: rounds to the joint fixed point


def balance_vo(wv: torch.Tensor, wo_heads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A and A⁻¹ that balance one kv-head: W_v [d, in] and its query heads' W_o [out, d]."""
    o = torch.cat(wo_heads, dim=0)  # [rep * out, d]
    q_o, r_o = torch.linalg.qr(o)
    q_v, r_v = torch.linalg.qr(wv.T)  # wv.T = q_v r_v
    u, s, wt = torch.linalg.svd(r_o @ r_v.T)
    left = q_o @ u  # M's left singular vectors: fix each sign basis-independently
    sign = torch.sign(left[left.abs().argmax(0), torch.arange(left.shape[1])])
    wt = wt * sign[:, None]
    half = s.sqrt()
    a = (half[:, None] * wt) @ torch.linalg.inv(r_v.T)
    a_inv = r_v.T @ (wt.T / half[None, :])
    return a, a_inv


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
            cond += self._layer(layer, geo)
        if cond:
            stats["vo_max_condition_of_A"] = max(cond)
        if "qk" in self.parts and geo.qk_norm:
            stats["qk"] = "skipped: q/k norms remove per-head scales"
        return StageResult(model, stats)

    def symmetries(self) -> frozenset[str]:
        """The configured parts: the symmetries whose orbits map to one representative."""
        return frozenset(self.parts)

    @torch.no_grad()
    def canonicalize_layer(self, layer: torch.nn.Module, config: Any) -> None:
        """One decoder layer to its canonical form, in place."""
        self._layer(layer, geometry(config))

    def _layer(self, layer: torch.nn.Module, geo) -> list[float]:
        """Every configured part on one layer; the V/O condition numbers of A. vo, qk and
        mlp act on disjoint tensors (one pass); `norm` scales the columns whose norms the
        others balance (and they its), so with it the parts repeat to a joint fixed point."""
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        for _ in range(NORM_ROUNDS if "norm" in self.parts else 1):
            before = [n.weight.detach().double().clone() for n in norms]
            if "norm" in self.parts:
                self._norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
                self._norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
            cond = self._vo(attn, geo) if "vo" in self.parts else []
            if "qk" in self.parts and not geo.qk_norm:
                self._qk(attn, geo)
            if "mlp" in self.parts:
                self._mlp(mlp)
            moved = max(
                float(((n.weight.double() - b).abs() / b.abs().clamp_min(1e-30)).max())
                for n, b in zip(norms, before)
            )
            if moved < NORM_TOL:
                break
        return cond

    @staticmethod
    def _norm(norm: torch.nn.Module, consumers: list[torch.nn.Linear]) -> None:
        """Balance an RMSNorm weight γ against its consumers' input columns: |γ_j| = ‖W[:, j]‖."""
        gamma = norm.weight.double()
        cols = torch.cat([lin.weight.double() for lin in consumers], dim=0).norm(dim=0)
        ok = (gamma != 0) & (cols > 0)
        c = torch.where(ok, (cols / gamma.abs().where(ok, 1.0)).sqrt(), 1.0)
        norm.weight.copy_((gamma * c).to(norm.weight.dtype))
        for lin in consumers:
            lin.weight.copy_((lin.weight.double() / c[None, :]).to(lin.weight.dtype))

    def _vo(self, attn: torch.nn.Module, geo) -> list[float]:
        d, rep = geo.head_dim, geo.group
        wv = attn.v_proj.weight.double()
        wo = attn.o_proj.weight.double()
        bv = attn.v_proj.bias.double() if attn.v_proj.bias is not None else None
        new_v, new_o = wv.clone(), wo.clone()
        new_b = bv.clone() if bv is not None else None
        conds = []
        for g in range(geo.num_kv_heads):
            rows = slice(g * d, (g + 1) * d)
            heads = range(g * rep, (g + 1) * rep)
            a, a_inv = balance_vo(wv[rows], [wo[:, h * d : (h + 1) * d] for h in heads])
            conds.append(float(torch.linalg.cond(a)))
            new_v[rows] = a @ wv[rows]
            if new_b is not None:
                new_b[rows] = a @ bv[rows]
            for h in heads:
                new_o[:, h * d : (h + 1) * d] = wo[:, h * d : (h + 1) * d] @ a_inv
        attn.v_proj.weight.copy_(new_v.to(attn.v_proj.weight.dtype))
        attn.o_proj.weight.copy_(new_o.to(attn.o_proj.weight.dtype))
        if new_b is not None:
            attn.v_proj.bias.copy_(new_b.to(attn.v_proj.bias.dtype))
        return conds

    def _qk(self, attn: torch.nn.Module, geo) -> None:
        d, rep = geo.head_dim, geo.group
        wq, wk = attn.q_proj.weight.double(), attn.k_proj.weight.double()
        cq = torch.ones(wq.shape[0], dtype=torch.float64)
        ck = torch.ones(wk.shape[0], dtype=torch.float64)
        for g in range(geo.num_kv_heads):
            q_rows = slice(g * rep * d, (g + 1) * rep * d)
            k_rows = slice(g * d, (g + 1) * d)
            nq = wq[q_rows].norm() / rep**0.5
            nk = wk[k_rows].norm()
            c = (nq / nk).sqrt()
            cq[q_rows], ck[k_rows] = 1.0 / c, c
        for lin, scale in ((attn.q_proj, cq), (attn.k_proj, ck)):
            lin.weight.copy_((lin.weight.double() * scale[:, None]).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_((lin.bias.double() * scale).to(lin.bias.dtype))

    def _mlp(self, mlp: torch.nn.Module) -> None:
        up, down = mlp.up_proj.weight.double(), mlp.down_proj.weight.double()
        c = (down.norm(dim=0) / up.norm(dim=1)).sqrt()
        mlp.up_proj.weight.copy_((up * c[:, None]).to(mlp.up_proj.weight.dtype))
        mlp.down_proj.weight.copy_((down / c[None, :]).to(mlp.down_proj.weight.dtype))
