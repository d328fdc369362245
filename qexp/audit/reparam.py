"""Check 1, reparameterization signs (attack=encrypt), no reference needed.

Per decoder layer l and kv-head g (query heads h ∈ group(g), d = head_dim):

- `vo_cond` = log10 cond(A), A the map taking the actual V/O factors of the head to their
  balanced refactoring (qexp.defenses.canonicalize.balance_vo: QR + SVD of the invariant
  product). A naturally trained head is close to balanced; mechanism A multiplies W_v[R_g] by
  an ill-conditioned matrix (condition number κ), which cond(A) reads back.
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
from tqdm.auto import tqdm

from qexp.audit.checkpoint import Checkpoint
from qexp.audit.stats import median, robust_z
from qexp.defenses.canonicalize import balance_vo
from qexp.models.geometry import Geometry, parse_name


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


def head_features(
    wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, geo: Geometry
) -> list[dict[str, float]]:
    """Per kv-head features of one layer (float64 inputs)."""
    d, rep = geo.head_dim, geo.group
    out = []
    for g in range(geo.num_kv_heads):
        rows = slice(g * d, (g + 1) * d)
        wo_heads = [wo[:, h * d : (h + 1) * d] for h in range(g * rep, (g + 1) * rep)]
        a, _ = balance_vo(wv[rows], wo_heads)
        nq = float(wq[g * rep * d : (g + 1) * rep * d].norm()) / math.sqrt(rep)
        nk = float(wk[rows].norm())
        qk = math.log(nq * nk) if geo.qk_norm else math.log(nq / nk)
        out.append(
            {
                "vo_cond": math.log10(float(torch.linalg.cond(a))),
                "vo_scale": math.log(float(wv[rows].norm()) / float(torch.cat(wo_heads).norm())),
                "qk_scale": qk,
            }
        )
    return out


def mlp_spread(up: torch.Tensor, down: torch.Tensor) -> float:
    """IQR over channels of ln(‖W_up[i]‖ / ‖W_down[:, i]‖) (norms in float64)."""
    nu = torch.linalg.vector_norm(up, dim=1, dtype=torch.float64)
    nd = torch.linalg.vector_norm(down, dim=0, dtype=torch.float64)
    r = (nu / nd.clamp_min(1e-30)).clamp_min(1e-30).log()
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


def run(ckpt: Checkpoint, geo: Geometry, progress: bool = True) -> dict[str, Any]:
    """Compute and score all reparameterization features, one layer at a time."""
    names = layer_names(ckpt)
    heads: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    for li in tqdm(range(geo.num_layers), desc="audit: reparam", disable=not progress):
        need = {r: names.get((li, f"{r}_weight")) for r in ("q", "k", "v", "o", "up", "down")}
        missing = [r for r, n in need.items() if n is None]
        if missing:
            raise KeyError(f"layer {li}: no {', '.join(missing)} projection weight")
        w = {r: ckpt.get(need[r]).double() for r in ("q", "k", "v", "o")}
        for g, feats in enumerate(head_features(w["q"], w["k"], w["v"], w["o"], geo)):
            heads.append({"layer": li, "kv_head": g, **feats})
        del w
        spread = mlp_spread(ckpt.get(need["up"]), ckpt.get(need["down"]))
        layers.append({"layer": li, "mlp_spread": spread})
    features: dict[str, Any] = {}
    for key in ("vo_cond", "vo_scale", "qk_scale"):
        s = score([h[key] for h in heads], LIMITS[key])
        for h, z, f in zip(heads, s.pop("z"), s.pop("flags")):
            h[f"{key}_z"], h[f"{key}_flag"] = z, f
        features[key] = s
    s = score([r["mlp_spread"] for r in layers], LIMITS["mlp_spread"])
    for r, z, f in zip(layers, s.pop("z"), s.pop("flags")):
        r["mlp_spread_z"], r["mlp_spread_flag"] = z, f
    features["mlp_spread"] = s
    flagged_heads = [
        {k: h[k] for k in ("layer", "kv_head")}
        | {"features": [k for k in LIMITS if h.get(f"{k}_flag")]}
        for h in heads
        if any(h.get(f"{k}_flag") for k in LIMITS)
    ]
    flagged_layers = [r["layer"] for r in layers if r["mlp_spread_flag"]]
    n_flag = len(flagged_heads) + len(flagged_layers)
    zs = [f["max_z"] for f in features.values() if f["max_z"] is not None]
    return {
        "verdict": "suspicious" if n_flag else "clean",
        "score": {"n_flagged": n_flag, "max_abs_z": max(zs) if zs else None},
        "features": features,
        "flagged_heads": flagged_heads,
        "flagged_mlp_layers": flagged_layers,
        "heads": heads,
        "layers": layers,
        "note": "mechanism B (near-identity low-rank residue) is not detectable statically",
    }
