"""Check 1, reparameterization signs (attack=encrypt), no reference needed.

Per decoder layer l and kv-head g (query heads h ∈ group(g), d = head_dim):

- `vo_cond` = log10 cond(A), A the map taking the actual V/O factors of the head to their
  balanced refactoring (qexp.defenses.canonicalize.balance_vo: R factors + SVD of the
  invariant product). A naturally trained head is close to balanced; mechanism A multiplies
  W_v[R_g] by an ill-conditioned matrix (condition number κ), which cond(A) reads back.
- `vo_scale` = ln(‖W_v[R_g]‖_F / ‖W_o[:, C_g]‖_F): a V/O needle γ moves it by 2 ln γ.
- `qk_scale` = ln(‖W_q[R_group(g)]‖_F / √rep / ‖W_k[R_g]‖_F) (Q/K needles: 2 ln γ); for q/k-norm
  architectures (Qwen3), where a needle scales both, ln(‖W_q‖ · ‖W_k‖ / √rep).
- per layer, `mlp_spread` = IQR over intermediate channels i of ln(‖W_up[i]‖ / ‖W_down[:, i]‖)
  (the MLP variant of A spreads these by ln κ).

Each feature is compared with the model's own population (robust z = (x - median) / 1.4826
MAD, for populations of 8 or more) and with absolute limits; see LIMITS. A head/layer is
flagged when a rule fires; the check is suspicious when anything is flagged. Mechanism B
(a rank-r residue I + εUVᵀ with ε ≈ 1e-2) changes cond(A) by about 2ε, inside the natural
spread, and is not detectable by this check (use --reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qexp.audit.stats import median, robust_z
from qexp.checkpoint.reader import Checkpoint
from qexp.core.geometry import Geometry, parse_name
from qexp.defenses.canonicalize import col_sq, gram_r, row_norms


@dataclass(frozen=True)
class Limit:
    """When a feature value is flagged.

    one-sided (`up`): x >= `absolute`, or z >= `z` and x - median >= `dev`;
    two-sided: |x - median| >= `absolute`, or |z| >= `z` and |x - median| >= `dev`.
    """

    up: bool
    absolute: float
    z: float
    dev: float


LIMITS = {
    # cond(A) >= 20 (clean SmolLM2 max 5.1, encrypt's default κ 28..32), or an outlier that is
    # 5x worse conditioned than the median head
    "vo_cond": Limit(up=True, absolute=math.log10(20.0), z=8.0, dev=math.log10(5.0)),
    # needles: a norm ratio 100x off the median, or an outlier 10x off it
    "vo_scale": Limit(up=False, absolute=math.log(100.0), z=8.0, dev=math.log(10.0)),
    "qk_scale": Limit(up=False, absolute=math.log(100.0), z=8.0, dev=math.log(10.0)),
    # channel-scale spread: IQR of ln ratios >= 0.5 (clean SmolLM2 max 0.1), or an outlier
    # layer with 3x the median spread
    "mlp_spread": Limit(up=True, absolute=0.5, z=8.0, dev=math.log(3.0)),
}


def layer_names(ckpt: Checkpoint) -> dict[tuple[int, str], str]:
    """(layer, role) -> tensor name, for the attention and MLP weights."""
    out = {}
    for name in ckpt.names:
        parsed = parse_name(name)
        if parsed is not None:
            out[parsed] = name
    return out


def reduce(role: str, w: torch.Tensor, geo: Geometry) -> dict[str, torch.Tensor]:
    """What the features need of one projection weight (small, float64): squared norms per
    kv-head (group of query heads for q, o), the R factors of V and O per kv-head (`balance_vo`
    reads the factors only through them), row norms of up and column norms of down."""
    d, rep, kv = geo.head_dim, geo.group, geo.num_kv_heads
    if role in ("q_weight", "k_weight"):
        return {"norm2": row_norms(w).square().reshape(kv, -1).sum(1)}
    if role == "v_weight":  # Gram of W_v[R_g]ᵀ per kv-head
        grams = [(h @ h.T) for h in (w[g * d : (g + 1) * d].double() for g in range(kv))]
    elif role == "o_weight":  # Gram of the stacked W_o[:, C_h], h in group(g)
        grams = []
        for g in range(kv):  # one kv-head's columns in float64 at a time
            cols = w[:, g * rep * d : (g + 1) * rep * d].double().reshape(-1, d)
            grams.append(cols.T @ cols)
    if role in ("v_weight", "o_weight"):
        gram = torch.stack(grams)
        return {"r": gram_r(gram), "norm2": gram.diagonal(dim1=1, dim2=2).sum(1)}
    if role == "up_weight":
        return {"norms": row_norms(w)}
    if role == "down_weight":
        return {"norms": col_sq(w).sqrt()}
    raise ValueError(f"no reparam reduction for {role}")


def vo_condition(r_v: torch.Tensor, r_o: torch.Tensor) -> float:
    """cond(A) of `balance_vo` from the R factors of W_vᵀ and the stacked W_o heads (A's row
    signs, which need the Q factors, do not change its condition number)."""
    _, s, wt = torch.linalg.svd(r_o @ r_v.T)
    return float(torch.linalg.cond((s.sqrt()[:, None] * wt) @ torch.linalg.inv(r_v.T)))


def features(red: dict[str, dict[str, torch.Tensor]], geo: Geometry) -> list[dict[str, float]]:
    """Per kv-head features of one layer from its q/k/v/o reductions."""
    out = []
    for g in range(geo.num_kv_heads):
        nq = math.sqrt(float(red["q_weight"]["norm2"][g])) / math.sqrt(geo.group)
        nk = math.sqrt(float(red["k_weight"]["norm2"][g]))
        v, o = red["v_weight"], red["o_weight"]
        out.append(
            {
                "vo_cond": math.log10(vo_condition(v["r"][g], o["r"][g])),
                "vo_scale": 0.5 * math.log(float(v["norm2"][g]) / float(o["norm2"][g])),
                "qk_scale": math.log(nq * nk) if geo.qk_norm else math.log(nq / nk),
            }
        )
    return out


def spread(up_norms: torch.Tensor, down_norms: torch.Tensor) -> float:
    """IQR over channels of ln(‖W_up[i]‖ / ‖W_down[:, i]‖)."""
    r = (up_norms / down_norms.clamp_min(1e-30)).clamp_min(1e-30).log()
    q = torch.quantile(r, torch.tensor([0.25, 0.75], dtype=r.dtype))
    return float(q[1] - q[0])


def flag(x: float, z: float | None, med: float, lim: Limit) -> bool:
    """Whether one value is flagged under `lim` (see Limit)."""
    dev = x - med if lim.up else abs(x - med)
    if lim.up:
        if x >= lim.absolute:
            return True
        return z is not None and z >= lim.z and dev >= lim.dev
    if dev >= lim.absolute:
        return True
    return z is not None and abs(z) >= lim.z and dev >= lim.dev


def score(values: list[float], lim: Limit) -> dict[str, Any]:
    """Robust z, flags and a summary for one feature's population."""
    z = robust_z(values)
    med = median(values)
    flags = [flag(x, zi, med, lim) for x, zi in zip(values, z)]
    zs = [abs(v) if not lim.up else v for v in z if v is not None]
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "max_z": max(zs) if zs else None,
        "n": len(values),
        "n_flagged": sum(flags),
        "z": z,
        "flags": flags,
        "limit": {"one_sided": lim.up, "absolute": lim.absolute, "z": lim.z, "dev": lim.dev},
    }


ROLES = ("q_weight", "k_weight", "v_weight", "o_weight", "up_weight", "down_weight")


class ReparamCheck:
    """Check 1 as a `qexp.audit.scan.Check`: per-tensor reductions, features per layer."""

    name = "reparam"

    def __init__(self, geo: Geometry) -> None:
        self.geo = geo
        self.roles: dict[str, tuple[int, str]] = {}

    def tensors(self, ckpt: Checkpoint) -> list[str]:
        names = layer_names(ckpt)
        for li in range(self.geo.num_layers):
            missing = [r.removesuffix("_weight") for r in ROLES if (li, r) not in names]
            if missing:
                raise KeyError(f"layer {li}: no {', '.join(missing)} projection weight")
        self.roles = {names[(li, r)]: (li, r) for li in range(self.geo.num_layers) for r in ROLES}
        return list(self.roles)

    def visit(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return reduce(self.roles[name][1], w, self.geo)

    def finish(self, parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Features per kv-head and layer, scored against the model's own population."""
        red: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for name, part in parts.items():
            li, role = self.roles[name]
            red.setdefault(li, {})[role] = part
        heads: list[dict[str, Any]] = []
        layers: list[dict[str, Any]] = []
        for li in range(self.geo.num_layers):
            for g, feats in enumerate(features(red[li], self.geo)):
                heads.append({"layer": li, "kv_head": g, **feats})
            mlp = spread(red[li]["up_weight"]["norms"], red[li]["down_weight"]["norms"])
            layers.append({"layer": li, "mlp_spread": mlp})
        return scored(heads, layers)


def scored(heads: list[dict[str, Any]], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Score all reparameterization features (robust z against the model's own, limits)."""
    feats: dict[str, Any] = {}
    for key in ("vo_cond", "vo_scale", "qk_scale"):
        s = score([h[key] for h in heads], LIMITS[key])
        for h, z, f in zip(heads, s.pop("z"), s.pop("flags")):
            h[f"{key}_z"], h[f"{key}_flag"] = z, f
        feats[key] = s
    s = score([r["mlp_spread"] for r in layers], LIMITS["mlp_spread"])
    for r, z, f in zip(layers, s.pop("z"), s.pop("flags")):
        r["mlp_spread_z"], r["mlp_spread_flag"] = z, f
    feats["mlp_spread"] = s
    flagged_heads = [
        {k: h[k] for k in ("layer", "kv_head")}
        | {"features": [k for k in LIMITS if h.get(f"{k}_flag")]}
        for h in heads
        if any(h.get(f"{k}_flag") for k in LIMITS)
    ]
    flagged_layers = [r["layer"] for r in layers if r["mlp_spread_flag"]]
    n_flag = len(flagged_heads) + len(flagged_layers)
    zs = [f["max_z"] for f in feats.values() if f["max_z"] is not None]
    return {
        "verdict": "suspicious" if n_flag else "clean",
        "score": {"n_flagged": n_flag, "max_abs_z": max(zs) if zs else None},
        "features": feats,
        "flagged_heads": flagged_heads,
        "flagged_mlp_layers": flagged_layers,
        "heads": heads,
        "layers": layers,
        "note": "mechanism B (near-identity low-rank residue) is not detectable statically",
    }
