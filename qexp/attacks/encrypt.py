"""attack=encrypt: function-preserving reparameterizations that make PTQ collapse.

Convention y = x Wᵀ + b, W: [out, in]. R_k: rows of kv-head k in W_k/W_v; C_h: columns of
query head h in W_o; query head h reads kv-head g(h) = h // (num_heads / num_kv_heads).

Per (layer, kv-head) one d×d matrix G = γ_vo · M · T folds into V/O exactly, because
attention mixes tokens, not channels: P (V G) = (P V) G.
    W_v[R_k] ← Gᵀ W_v[R_k]      b_v[R_k] ← Gᵀ b_v[R_k]      W_o[:, C_h] ← W_o[:, C_h] G⁻ᵀ
- A: M = blockdiag(H D_κ Hᵀ) (normalized Hadamard H, diagonal D with condition number κ,
  blocks of min(group_size, head_dim)); optional MLP variant W_up[i] ← d_i W_up[i],
  W_down[:, i] ← W_down[:, i] / d_i.
- B: T = I + ε U Vᵀ (rank r, U, V Hadamard columns), T⁻¹ = I − ε U (I_r + ε VᵀU)⁻¹ Vᵀ.
- C: needles: γ_vo in G; on Q/K W_q[R_h] ← γ W_q[R_h], W_k[R_k] ← W_k[R_k] / γ (biases
  too; a scalar per head commutes with RoPE). With q/k norms (Qwen3) both are scaled by γ:
  the norm removes the scale, exact up to the RMSNorm ε.
- D (exact in every binary float format): per-channel powers of two s = 2^e folded into a
  producer (÷s) and its consumer's input columns (×s), at four sites per layer:
  attn_in (input_layernorm weight ÷ s, q/k/v columns × s), mlp_in (post_attention_layernorm
  ÷ s, gate/up columns × s), mlp_out (up rows ÷ s, down columns × s) and attn_out (v rows of
  kv-head k ÷ s, o columns of every query head reading k × s). In each block of
  `anchor_block` channels `anchors` channels get e ∈ anchor_exp, the rest e = 0: the anchor
  column dominates every quantization group (and row) that contains it, so the other weights
  of the group round to zero, while every product w·x is bit-identical (scaling by 2^e
  commutes with rounding), so logits are bit-identical in bf16 and fp32 (fp16 may underflow).
Against a canonicalizing defense (`against=[canonicalize]`) only the mechanisms and sites
outside the symmetries it normalises are applied (A, B and V/O needles: vo; Q/K needles:
qk; D's sites: attn_in/mlp_in: norm, mlp_out: mlp, attn_out: vo); none left is an error.
Everything is computed in float64 from a plan drawn from one seed, and applied tensor by
tensor, so the in-memory and streaming paths write identical bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

import numpy as np
import torch

from qexp.attacks import adaptive
from qexp.attacks.base import Attack
from qexp.core.context import RunContext
from qexp.core.errors import check
from qexp.core.geometry import Geometry, geometry, parse_name, parse_norm_name
from qexp.core.plugin import StageResult, Subject

NEEDLE_SITES = ("qk", "vo")
ANCHOR_SITES = ("attn_in", "mlp_in", "mlp_out", "attn_out")
# preset -> its mechanisms; `exact` allows only the mechanisms that are exact in bf16
PRESETS = {"paper": ("a", "b", "c"), "exact": ("d",)}
# the canonicalization symmetry (qexp/defenses/canonicalize.py) each mechanism / site lies in
SYMMETRY = {"a": "vo", "b": "vo", "qk": "qk", "vo": "vo", "mlp": "mlp"}
SYMMETRY.update({"attn_in": "norm", "mlp_in": "norm", "mlp_out": "mlp", "attn_out": "vo"})


def hadamard(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (n a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def block_size(head_dim: int, group_size: int) -> int:
    """Largest power of two dividing head_dim and not above group_size."""
    b = head_dim & -head_dim
    while b > group_size:
        b //= 2
    return b


@dataclass
class HeadKey:
    """The secret of one (layer, kv-head): its V/O matrix and Q/K scale."""

    g: torch.Tensor  # [d, d] float64
    g_inv: torch.Tensor
    gamma_qk: float = 1.0


@dataclass
class LayerKey:
    """Per-layer parameters actually drawn (recorded in the manifest) and the head keys."""

    kappa: Optional[float] = None
    eps: Optional[float] = None
    needles: dict[int, float] = field(default_factory=dict)
    heads: list[HeadKey] = field(default_factory=list)
    mlp_scale: Optional[torch.Tensor] = None
    anchors: dict[str, torch.Tensor] = field(default_factory=dict)  # D: site -> 2^e, float64

    def summary(self) -> dict[str, Any]:
        """JSON-able record of this layer's drawn parameters (no key matrices)."""
        return {
            "kappa": self.kappa,
            "eps": self.eps,
            "needles": {str(k): v for k, v in self.needles.items()},
            "mlp": self.mlp_scale is not None,
            "anchors": {site: int((s != 1.0).sum()) for site, s in self.anchors.items()},
        }


@dataclass
class Encrypt(adaptive.Adapts, Attack):
    """Quantization-adversarial reparameterization (mechanisms A, B, C; any subset)."""

    name: str = "encrypt"
    preset: str = "paper"
    mechanisms: Optional[List[str]] = None  # None: the preset's
    seed: int = 0
    band: List[int] = field(default_factory=list)  # [start, end) layers; [] = all
    group_size: int = 128
    # A
    kappa: List[float] = field(default_factory=lambda: [28.0, 32.0])
    kappa_one_layers: int = 4
    kappa_one_min_spacing: int = 3
    mlp: bool = False
    # B
    b_every: int = 3
    rank: int = 2
    eps: List[float] = field(default_factory=lambda: [6e-3, 1e-2])
    # C
    rho: float = 0.0625
    gamma: List[float] = field(default_factory=lambda: [24.0, 50.0])
    spikes: int = 4
    spike_gamma: List[float] = field(default_factory=lambda: [256.0, 512.0])
    needle_sites: List[str] = field(default_factory=lambda: ["qk", "vo"])
    # D
    anchor_sites: List[str] = field(default_factory=lambda: list(ANCHOR_SITES))
    anchor_block: int = 32
    anchors: int = 1
    anchor_exp: List[int] = field(default_factory=lambda: [11, 13])
    # function preservation (original vs attacked on a fixed probe batch)
    tolerance: float = 1e-2
    check_preservation: bool = True
    against: List[str] = field(default_factory=list)
    # derived: the mechanisms and sites as configured (an adapted canonicalization, set by
    # `resolve`, narrows `mechanisms`, `needle_sites`, `anchor_sites` and `mlp` to those it
    # cannot undo)
    requested: Dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    adaptations: Dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    preserves_function: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", self.preset, "one of " + ", ".join(PRESETS))
        if self.mechanisms is None:
            self.mechanisms = list(PRESETS[self.preset])
        allowed = (
            PRESETS["paper"] + PRESETS["exact"] if self.preset == "paper" else PRESETS[self.preset]
        )
        what = "a non-empty subset of " + ", ".join(allowed)
        if self.preset == "exact":
            what += " (preset=exact: only the mechanisms exact in bf16)"
        check(len(self.mechanisms) > 0, "mechanisms", self.mechanisms, what)
        for m in self.mechanisms:
            check(m in allowed, "mechanisms", m, what)
        for s in self.anchor_sites:
            check(s in ANCHOR_SITES, "anchor_sites", s, "a subset of " + ", ".join(ANCHOR_SITES))
        check(self.anchor_block >= 1, "anchor_block", self.anchor_block, "an integer >= 1")
        check(
            1 <= self.anchors <= self.anchor_block,
            "anchors",
            self.anchors,
            f"an integer in [1, anchor_block={self.anchor_block}]",
        )
        check(
            len(self.anchor_exp) == 2
            and all(float(e).is_integer() for e in self.anchor_exp)
            and 1 <= self.anchor_exp[0] <= self.anchor_exp[1] <= 24,
            "anchor_exp",
            self.anchor_exp,
            "integer exponents [lo, hi] with 1 <= lo <= hi <= 24 (anchors scaled by 2^e)",
        )
        check(
            len(self.band) in (0, 2) and (not self.band or 0 <= self.band[0] < self.band[1]),
            "band",
            self.band,
            "[] (all layers) or [start, end) with 0 <= start < end",
        )
        check(self.group_size >= 2, "group_size", self.group_size, "an integer >= 2")
        for key, lo_min in (("kappa", 1.0), ("eps", 0.0), ("gamma", 1.0), ("spike_gamma", 1.0)):
            v = getattr(self, key)
            check(
                len(v) == 2 and lo_min <= v[0] <= v[1],
                key,
                v,
                f"a range [lo, hi] with {lo_min} <= lo <= hi",
            )
        check(self.kappa_one_layers >= 0, "kappa_one_layers", self.kappa_one_layers, ">= 0")
        check(
            self.kappa_one_min_spacing >= 1,
            "kappa_one_min_spacing",
            self.kappa_one_min_spacing,
            "an integer >= 1",
        )
        check(self.b_every >= 1, "b_every", self.b_every, "an integer >= 1")
        check(self.rank >= 1, "rank", self.rank, "an integer >= 1")
        check(0.0 <= self.rho <= 1.0, "rho", self.rho, "a fraction in [0, 1]")
        check(self.spikes >= 0, "spikes", self.spikes, "an integer >= 0")
        for s in self.needle_sites:
            check(s in NEEDLE_SITES, "needle_sites", s, "a subset of qk, vo")
        check(self.tolerance > 0, "tolerance", self.tolerance, "a number > 0")

    def resolve(self, spec: Any) -> None:
        """The adapted canonicalization (the run's own where it is the one named) narrows the
        mechanisms and sites that run; `requested` keeps them as configured."""
        if not self.requested:
            self.requested = {
                "mechanisms": list(self.mechanisms),
                "needle_sites": list(self.needle_sites),
                "anchor_sites": list(self.anchor_sites),
                "mlp": self.mlp,
            }
        run = spec.defense if spec is not None else None
        kinds = (AgainstCanonical, AgainstRotation)
        self.adaptations = adaptive.resolve(self.against, kinds, self, run, f"{self.group}.against")

    def fingerprint(self) -> Any:
        """The adapted defense's settings (they decide which mechanisms apply)."""
        return adaptive.fingerprint(self.adaptations) if self.adaptations else None

    def check_model(self, config: Any) -> None:
        """A supported architecture, a band within its layers, a rank below head_dim."""
        self.plan(geometry(config))

    def preservation_tolerance(self) -> Optional[float]:
        return self.tolerance if self.check_preservation else None

    def preservation_tolerance_bf16(self) -> Optional[float]:
        """preset=exact promises bit-identical bf16 logits: any drift stops the run (not
        against a rotation, whose delivery rotates the weights back in float arithmetic)."""
        exact = self.preset == "exact" and "rotation" not in self.adaptations
        return 0.0 if self.check_preservation and exact else None

    # ---------------------------------------------------------------- plan
    def layers(self, geo: Geometry) -> list[int]:
        """The layer band."""
        if not self.band:
            return list(range(geo.num_layers))
        check(
            self.band[1] <= geo.num_layers,
            "attack.band",
            self.band,
            f"within the model's {geo.num_layers} layers",
        )
        return list(range(self.band[0], self.band[1]))

    def plan(self, geo: Geometry) -> dict[int, LayerKey]:
        """Draw every layer's key from `seed` (same seed and geometry → same plan)."""
        d = geo.head_dim
        check(self.rank < d, "attack.rank", self.rank, f"an integer < head_dim={d}")
        rng = np.random.default_rng(self.seed)
        layers = self.layers(geo)
        keys = {li: LayerKey() for li in layers}
        kappas = self._kappas(rng, layers) if "a" in self.mechanisms else {}
        eps = (
            {li: float(rng.uniform(*self.eps)) for li in layers[:: self.b_every]}
            if "b" in self.mechanisms
            else {}
        )
        needles = self._needles(rng, layers, geo) if "c" in self.mechanisms else {}
        bs = block_size(d, self.group_size)
        h_blk, h_d = hadamard(bs), hadamard(d) if d & (d - 1) == 0 else None
        abc = any(m in self.mechanisms for m in PRESETS["paper"])  # head keys (V/O, Q/K)
        for li in layers:
            key = keys[li]
            key.kappa, key.eps = kappas.get(li), eps.get(li)
            key.needles = {k: g for (j, k), g in needles.items() if j == li}
            for k in range(geo.num_kv_heads if abc else 0):
                g = torch.eye(d, dtype=torch.float64)
                g_inv = torch.eye(d, dtype=torch.float64)
                if key.kappa is not None and key.kappa > 1:
                    m, m_inv = self._ill_conditioned(rng, d, bs, h_blk, key.kappa)
                    g, g_inv = g @ m, m_inv @ g_inv
                if key.eps is not None:
                    t, t_inv = self._low_rank(rng, d, h_d, key.eps)
                    g, g_inv = g @ t, t_inv @ g_inv
                gamma = key.needles.get(k, 1.0)
                if "vo" in self.needle_sites and gamma != 1.0:
                    g, g_inv = g * gamma, g_inv / gamma
                qk = gamma if "qk" in self.needle_sites else 1.0
                key.heads.append(HeadKey(g, g_inv, qk))
            if self.mlp and key.kappa is not None and key.kappa > 1:
                key.mlp_scale = self._spread(rng, geo.intermediate_size, key.kappa)
        if "d" in self.mechanisms:
            self._plan_anchors(keys, geo)
        return keys

    def _plan_anchors(self, keys: dict[int, LayerKey], geo: Geometry) -> None:
        """D's anchor scales, from a generator of their own (A/B/C's plan is unchanged)."""
        rng = np.random.default_rng([self.seed, 0xD])
        widths = {
            "attn_in": geo.hidden_size,
            "mlp_in": geo.hidden_size,
            "mlp_out": geo.intermediate_size,
            "attn_out": geo.num_kv_heads * geo.head_dim,
        }
        lo, hi = (int(e) for e in self.anchor_exp)
        for key in keys.values():  # layers in band order
            for site in ANCHOR_SITES:  # fixed order: the plan does not depend on the list order
                n = widths[site]
                exps = np.zeros(n, dtype=np.int64)
                for start in range(0, n, self.anchor_block):
                    width = min(self.anchor_block, n - start)
                    pick = rng.choice(width, size=min(self.anchors, width), replace=False)
                    exps[start + pick] = rng.integers(lo, hi + 1, size=pick.size)
                if site in self.anchor_sites:
                    key.anchors[site] = torch.from_numpy(np.ldexp(1.0, exps))

    def _kappas(self, rng: np.random.Generator, layers: list[int]) -> dict[int, float]:
        kappas = {li: float(rng.uniform(*self.kappa)) for li in layers}
        n, s = self.kappa_one_layers, self.kappa_one_min_spacing
        check(
            n == 0 or (n - 1) * s + 1 <= len(layers),
            "attack.kappa_one_layers",
            n,
            f"at most {(len(layers) - 1) // s + 1} layers {s} apart in a band of {len(layers)}",
        )
        for _ in range(10_000):
            pick = sorted(rng.choice(len(layers), size=n, replace=False).tolist())
            if all(b - a >= s for a, b in zip(pick, pick[1:])):
                break
        else:  # pragma: no cover - feasible by the check above; sampling is very unlikely to fail
            pick = list(range(0, n * s, s))
        for i in pick:
            kappas[layers[i]] = 1.0
        return kappas

    def _needles(
        self, rng: np.random.Generator, layers: list[int], geo: Geometry
    ) -> dict[tuple[int, int], float]:
        pairs = [(li, k) for li in layers for k in range(geo.num_kv_heads)]
        n_mild = min(len(pairs), round(self.rho * len(pairs)))
        n_spike = min(len(pairs) - n_mild, self.spikes)
        order = rng.permutation(len(pairs))
        out = {}
        for i in order[:n_mild]:
            out[pairs[i]] = float(rng.uniform(*self.gamma))
        for i in order[n_mild : n_mild + n_spike]:
            out[pairs[i]] = float(rng.uniform(*self.spike_gamma))
        return out

    @staticmethod
    def _spread(rng: np.random.Generator, n: int, kappa: float) -> torch.Tensor:
        """n values log-spaced over [κ^-1/2, κ^1/2] in random order (condition number κ)."""
        vals = np.exp(np.linspace(-0.5, 0.5, n) * math.log(kappa))
        return torch.from_numpy(vals[rng.permutation(n)].copy())

    def _ill_conditioned(
        self, rng: np.random.Generator, d: int, bs: int, h: torch.Tensor, kappa: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.zeros(d, d, dtype=torch.float64)
        m_inv = torch.zeros(d, d, dtype=torch.float64)
        for j in range(0, d, bs):
            dk = self._spread(rng, bs, kappa)
            m[j : j + bs, j : j + bs] = h @ torch.diag(dk) @ h.T
            m_inv[j : j + bs, j : j + bs] = h @ torch.diag(1.0 / dk) @ h.T
        return m, m_inv

    def _low_rank(
        self, rng: np.random.Generator, d: int, h: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if h is not None:
            cols = rng.choice(d, size=2 * self.rank, replace=False)
            u, v = h[:, cols[: self.rank]], h[:, cols[self.rank :]]
        else:  # head_dim not a power of two: seeded orthonormal columns instead
            q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((d, 2 * self.rank))))
            u, v = q[:, : self.rank], q[:, self.rank :]
        eye = torch.eye(d, dtype=torch.float64)
        t = eye + eps * u @ v.T
        core = torch.linalg.inv(torch.eye(self.rank, dtype=torch.float64) + eps * v.T @ u)
        return t, eye - eps * u @ core @ v.T

    # ----------------------------------------------------------- transform
    def transform(
        self, name: str, tensor: torch.Tensor, keys: dict[int, LayerKey], geo: Geometry
    ) -> torch.Tensor | None:
        """The encrypted version of one named tensor (same dtype), or None if untouched."""
        parsed = self._parse(name)
        if parsed is None or parsed[0] not in keys:
            return None
        layer, role = parsed
        key = keys[layer]
        out = apply_role(role, tensor.double(), key, geo)
        return None if out is None else out.to(tensor.dtype)

    @staticmethod
    def _parse(name: str) -> tuple[int, str] | None:
        return parse_name(name) or parse_norm_name(name)

    def touches(self, name: str, keys: dict[int, LayerKey]) -> bool:
        """Whether `transform` changes this tensor (so untouched ones are never decoded)."""
        parsed = self._parse(name)
        if parsed is None or parsed[0] not in keys:
            return False
        key, role = keys[parsed[0]], parsed[1]
        if any(role in ANCHOR_ROLES[site] for site in key.anchors):
            return True
        if role in ("v_weight", "v_bias", "o_weight"):
            return bool(key.heads)
        if role[0] in "qk":
            return any(h.gamma_qk != 1.0 for h in key.heads)
        return role in ("up_weight", "down_weight") and key.mlp_scale is not None

    def apply(self, subject: Subject, ctx: RunContext) -> StageResult:
        model = subject.model
        geo = geometry(model.config)
        keys = self.plan(geo)
        with torch.no_grad():
            for name, p in model.named_parameters():  # tied weights appear once
                new = self.transform(name, p.data.cpu(), keys, geo)
                if new is not None:
                    p.data.copy_(new.to(p.device))
        return StageResult(model, self.manifest(keys, geo))

    def manifest(self, keys: dict[int, LayerKey], geo: Geometry) -> dict[str, Any]:
        """Parameters used: the config, the geometry and each layer's drawn values."""
        cfg = self.settings()
        out = {"attack": cfg}
        if self.adaptations:
            out["against"] = {"requested": self.requested, "applied": cfg["mechanisms"]}
        return {
            **out,
            "geometry": asdict(geo),
            "layers": {str(li): k.summary() for li, k in keys.items()},
        }


class AgainstCanonical(adaptive.Adaptation):
    """Against a canonicalizing defense: only the mechanisms and sites outside its
    symmetries run (all of them without one)."""

    surface = "canonical"

    def bind(self, prefix: str) -> None:
        enc, seen, r = self.attack, self.defense.symmetries(), self.attack.requested
        enc.needle_sites = [x for x in enc.needle_sites if SYMMETRY[x] not in seen]
        enc.anchor_sites = [x for x in enc.anchor_sites if SYMMETRY[x] not in seen]
        enc.mlp = enc.mlp and "mlp" not in seen
        left = {"a": "vo" not in seen, "b": "vo" not in seen, "c": bool(enc.needle_sites)}
        left["d"] = bool(enc.anchor_sites)
        enc.mechanisms = [m for m in enc.mechanisms if left[m]]
        check(
            bool(enc.mechanisms),
            prefix + "against",
            enc.against,
            f"a canonicalization one of mechanisms={r['mechanisms']} survives: parts "
            f"{sorted(seen)} undo every one (docs/defenses.md#what-canonicalize-undoes)",
        )


class AgainstRotation(adaptive.AgainstRotation):
    """Against a rotation: encrypt in the rotated basis, without the RMSNorm-fed anchor sites
    (attn_in, mlp_in). There a site scales norm weights per rotated channel, which no
    RMSNorm of the delivered (rotated back) model can express; the defender's norm fusion
    would fold them into the next linears anyway."""

    def bind(self, prefix: str) -> None:
        super().bind(prefix)
        enc = self.attack
        enc.anchor_sites = [x for x in enc.anchor_sites if x not in NORM_FED]
        if not enc.anchor_sites:
            enc.mechanisms = [m for m in enc.mechanisms if m != "d"]
        check(
            bool(enc.mechanisms),
            prefix + "against",
            enc.against,
            f"a rotation one of mechanisms={self.attack.requested['mechanisms']} survives: "
            f"only D at the norm-fed sites {list(NORM_FED)} was asked for",
        )


NORM_FED = ("attn_in", "mlp_in")  # anchor sites whose producer is an RMSNorm weight
# D: the roles each site touches (producer ÷ s, consumer input columns × s)
ANCHOR_ROLES = {
    "attn_in": ("input_norm", "q_weight", "k_weight", "v_weight"),
    "mlp_in": ("post_norm", "gate_weight", "up_weight"),
    "mlp_out": ("up_weight", "up_bias", "down_weight"),
    "attn_out": ("v_weight", "v_bias", "o_weight"),
}


def apply_role(role: str, w: torch.Tensor, key: LayerKey, geo: Geometry) -> torch.Tensor | None:
    """Transform one float64 tensor of a layer by its role: A/B/C, then D's anchors."""
    out = _apply_abc(role, w, key, geo)
    scaled = _apply_anchors(role, w if out is None else out, key, geo)
    return out if scaled is None else scaled


def _apply_anchors(role: str, w: torch.Tensor, key: LayerKey, geo: Geometry) -> torch.Tensor | None:
    """D: divide producers, multiply consumers' input columns by the sites' 2^e (exact)."""
    sites = [s for s in key.anchors if role in ANCHOR_ROLES[s]]
    if not sites:
        return None
    for site in sites:
        s = key.anchors[site]
        if role in ("input_norm", "post_norm", "up_bias", "v_bias"):
            w = w / s
        elif role in ("up_weight", "v_weight") and site in ("mlp_out", "attn_out"):
            w = w / s[:, None]  # producer rows
        elif role == "o_weight":  # query head h reads kv-head h // group
            w = w * s.reshape(geo.num_kv_heads, -1).repeat_interleave(geo.group, 0).reshape(-1)
        else:  # consumer input columns
            w = w * s[None, :]
    return w


def _apply_abc(role: str, w: torch.Tensor, key: LayerKey, geo: Geometry) -> torch.Tensor | None:
    """A/B/C on one float64 tensor by its role (q/k/v/o/up/down weight/bias)."""
    d, kv, rep = geo.head_dim, geo.num_kv_heads, geo.group
    heads = key.heads
    if role in ("v_weight", "v_bias"):
        if not heads:
            return None
        g = torch.stack([h.g for h in heads])  # [kv, d, d]
        x = w.reshape(kv, d, -1)
        return torch.einsum("kij,kih->kjh", g, x).reshape(w.shape)
    if role == "o_weight":
        if not heads:
            return None
        g_inv = torch.stack([heads[h // rep].g_inv for h in range(geo.num_heads)])
        x = w.reshape(w.shape[0], geo.num_heads, d)
        return torch.einsum("ohi,hji->ohj", x, g_inv).reshape(w.shape)
    if role in ("q_weight", "q_bias", "k_weight", "k_bias"):
        gam = torch.tensor([h.gamma_qk for h in heads], dtype=torch.float64)
        if not heads or bool((gam == 1.0).all()):
            return None
        if role.startswith("q"):
            scale = gam.repeat_interleave(rep)
        else:
            scale = gam if geo.qk_norm else 1.0 / gam
        x = w.reshape(scale.numel(), d, -1)
        return (x * scale[:, None, None]).reshape(w.shape)
    if role == "up_weight" and key.mlp_scale is not None:
        return w * key.mlp_scale[:, None]
    if role == "down_weight" and key.mlp_scale is not None:
        return w / key.mlp_scale[None, :]
    return None
