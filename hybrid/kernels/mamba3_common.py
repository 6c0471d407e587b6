"""What every Mamba-3 path shares: the containers it passes around and the per-token
pieces of MAMBA3.md §2 (A, Δ, λ, angles, B/C normalisation, rotation, output gate).

Shapes use Bt batch, L tokens, H heads, P headdim, N d_state, R MIMO rank, G groups and
S rotary angles. The reference, the chunked path and the decode step all call these, so
each piece is tested against its closed form on its own (tests/test_mamba3_math.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid.kernels.norms import gated_rms_norm, rms_norm

ROTATIONS = ("pairwise", "halves")
A_ACTIVATIONS = ("heavy_tail", "softplus")
TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class Mamba3Options:
    """Static choices of the op.

    rotation: "pairwise" rotates dims (2i, 2i+1) (the SISO kernels), "halves" rotates
    (i, i+N/2) (the MIMO kernels); a_activation: "heavy_tail" (mamba_ssm HEAD, PR #962) or
    "softplus" (release 2.3.2).
    """

    rotation: str = "pairwise"
    a_activation: str = "heavy_tail"
    a_floor: float = 1e-4
    bc_norm_eps: float = 1e-5
    out_norm_eps: float = 1e-5


class Mamba3Inputs(NamedTuple):
    """The in_proj outputs, split. With a token axis (Bt, L, ...) or, for one step, without."""

    x: Tensor  # (Bt, L, H, P)
    z: Tensor  # (Bt, L, H, P)
    b: Tensor  # (Bt, L, R, G, N), before RMSNorm
    c: Tensor  # (Bt, L, R, G, N), before RMSNorm
    dt: Tensor  # (Bt, L, H), before dt_bias and softplus
    a: Tensor  # (Bt, L, H), before the A activation
    trap: Tensor  # (Bt, L, H), before the sigmoid
    angle: Tensor  # (Bt, L, S), before π·tanh


class Mamba3Weights(NamedTuple):
    """The layer's own parameters; the MIMO projections and the pre-gate norm are optional."""

    dt_bias: Tensor  # (H,)
    b_norm: Tensor  # (N,)
    c_norm: Tensor  # (N,)
    b_bias: Tensor  # (H, R, N)
    c_bias: Tensor  # (H, R, N)
    d: Tensor  # (H,)
    mimo_x: Tensor | None = None  # (H, R, P)
    mimo_z: Tensor | None = None  # (H, R, P)
    mimo_o: Tensor | None = None  # (H, R, P)
    out_norm: Tensor | None = None  # (H, P): pre-gate grouped RMSNorm weight


@dataclass
class Mamba3State:
    """Decode cache of one layer: the last token's accumulated angle, its SSM state without
    its own γ term, its rotated, biased k and raw x, and its γ.

    `ssm` holds H⁻_t = H_t − γ_t u_t, u_t = Σ_r x̃_{t,r} k_{t,r}ᵀ (`full_ssm` gives H_t). A step
    then adds one rank-R product, H⁻_{t+1} = α H⁻_t + (α γ_t + β) u_t, where H takes two (β's
    of the cached token and γ's of the new one), and y_r = H⁻ q_r + γ Σ_r' x̃_r' (k_r'·q_r)
    needs only R×R dot products besides: a decode step, which streams the state once, does
    R FMAs less per state element.

    `empty` (host-side) promises that the state is that of an empty prefix: set by `zeros`
    and `zero_`, cleared by whatever writes the state (`advance` for replayed graphs). A
    prefill then needn't read it (no initial-state kernel, no initial state in the scan);
    any other state, however made, is read."""

    angle: Tensor  # (Bt, H, S), radians in [0, 2π)
    ssm: Tensor  # (Bt, H, P, N): H⁻
    k: Tensor  # (Bt, R, H, N)
    x: Tensor  # (Bt, H, P)
    gamma: Tensor  # (Bt, H), float32 or wider
    empty: bool = field(default=False, compare=False)

    @classmethod
    def zeros(
        cls,
        batch: int,
        n_heads: int,
        headdim: int,
        d_state: int,
        n_angles: int,
        rank: int,
        *,
        dtype: torch.dtype,
        state_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Mamba3State:
        """The state of an empty prefix: feeding it equals starting with no state."""
        angle_dtype = torch.promote_types(state_dtype, torch.float32)
        return cls(
            angle=torch.zeros(batch, n_heads, n_angles, dtype=angle_dtype, device=device),
            ssm=torch.zeros(batch, n_heads, headdim, d_state, dtype=state_dtype, device=device),
            k=torch.zeros(batch, rank, n_heads, d_state, dtype=dtype, device=device),
            x=torch.zeros(batch, n_heads, headdim, dtype=dtype, device=device),
            gamma=torch.zeros(batch, n_heads, dtype=angle_dtype, device=device),
            empty=True,
        )

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.angle, self.ssm, self.k, self.x, self.gamma)

    def copy_(self, other: Mamba3State) -> None:
        """Overwrite in place, so captured CUDA graphs and outside references stay valid."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs)
        self.empty = other.empty

    def zero_(self) -> None:
        """Empty in place (the state of an empty prefix)."""
        for t in self.tensors():
            t.zero_()
        self.empty = True

    def advance(self, n: int) -> None:
        """Replayed graphs of `n` steps wrote this state on the device: not empty any more."""
        if n > 0:
            self.empty = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def full_ssm(self, mimo_x: Tensor | None, beta_free: Tensor | None = None) -> Tensor:
        """H_t = H⁻_t + γ_t Σ_r x̃_r k_rᵀ (Bt, H, P, N), in at least float32. Given the next
        token's β' (Bt, H), the state a scan carries into it instead: H_t + β' Σ_r x̃_r k_rᵀ."""
        outer = token_outer(self.x, self.k, mimo_x)
        coeff = self.gamma.to(outer.dtype)
        if beta_free is not None:
            coeff = coeff + beta_free.to(outer.dtype)
        return self.ssm.to(outer.dtype) + coeff[..., None, None] * outer

    @classmethod
    def from_full_ssm(
        cls,
        full: Tensor,
        *,
        angle: Tensor,
        k: Tensor,
        x: Tensor,
        gamma: Tensor,
        mimo_x: Tensor | None,
        ssm_dtype: torch.dtype,
        outer: Tensor | None = None,
    ) -> Mamba3State:
        """The cache of a token whose state is H (`full`), with k and x as the cache keeps
        them: ssm = H − γ Σ_r x̃_r k_rᵀ, so `full_ssm` rebuilds H exactly. `outer`: that sum,
        where the caller has it already."""
        if outer is None:
            outer = token_outer(x, k, mimo_x)
        dtype = torch.promote_types(full.dtype, outer.dtype)
        ssm = full.to(dtype) - gamma.to(dtype)[..., None, None] * outer.to(dtype)
        return cls(angle=angle, ssm=ssm.to(ssm_dtype), k=k, x=x, gamma=gamma)


def prefix_state(state: Mamba3State | None) -> Mamba3State | None:
    """The state a scan starts from: None where there is none or it is marked `empty`."""
    return None if state is None or state.empty else state


def n_rope_angles(d_state: int, rope_fraction: float) -> int:
    """S = floor_even(N · rope_fraction) / 2 (32 for N=128 at the default 0.5)."""
    rotated = int(d_state * rope_fraction)
    return (rotated - rotated % 2) // 2


def is_power_of_two(n: int) -> bool:
    """Kernel tile sizes (headdim, d_state, rank) must be powers of two."""
    return n > 0 and n & (n - 1) == 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decay, angle and state arithmetic run in at least float32, as the kernels do."""
    return torch.promote_types(dtype, torch.float32)


def a_coefficient(raw: Tensor, activation: str, floor: float) -> Tensor:
    """A = −max(f(raw), floor): f is the heavy tail 1+u (u≥0), 1/(1−u) (u<0), or softplus."""
    if activation == "heavy_tail":
        # min(u, 0) keeps the unused branch finite, so its gradient never turns into NaN
        f = torch.where(raw >= 0, 1.0 + raw, 1.0 / (1.0 - raw.clamp(max=0.0)))
    elif activation == "softplus":
        f = F.softplus(raw)
    else:
        raise ValueError(f"a_activation={activation!r} is invalid; allowed: {A_ACTIVATIONS}")
    return -f.clamp(min=floor)


class Discretisation(NamedTuple):
    """Per token and head: Δ, log α = Δ·A, γ = λΔ and β' = (1−λ)Δ (β = α·β')."""

    delta: Tensor
    log_alpha: Tensor
    gamma: Tensor
    beta_free: Tensor


def discretise(dt: Tensor, a: Tensor, trap: Tensor, dt_bias: Tensor, options: Mamba3Options):
    """The exponential-trapezoidal coefficients, in at least float32."""
    cdt = compute_dtype(dt.dtype)
    delta = F.softplus(dt.to(cdt) + dt_bias.to(cdt))
    coeff = a_coefficient(a.to(cdt), options.a_activation, options.a_floor)
    lam = torch.sigmoid(trap.to(cdt))
    return Discretisation(delta, delta * coeff, lam * delta, (1.0 - lam) * delta)


def angle_increments(angle: Tensor, delta: Tensor) -> Tensor:
    """Δ_{t,h} · π·tanh(angle_t): (..., S) and (..., H) -> (..., H, S)."""
    theta = math.pi * torch.tanh(angle.to(delta.dtype))
    return delta.unsqueeze(-1) * theta.unsqueeze(-2)


def wrap_angle(phi: Tensor) -> Tensor:
    """Reduce to [0, 2π): the same rotation, without float32 drift over long sequences."""
    return torch.remainder(phi, TWO_PI)


def normalize_bc(v: Tensor, norm_weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """RMSNorm over N, broadcast groups to heads, then add the per-head bias.

    v: (..., R, G, N), bias: (H, R, N) -> (..., R, H, N); head h reads group h // (H/G).
    """
    n_heads, n_groups = bias.shape[0], v.shape[-2]
    normed = rms_norm(v, norm_weight, eps).to(compute_dtype(v.dtype))
    heads = normed.repeat_interleave(n_heads // n_groups, dim=-2)
    return heads + bias.transpose(0, 1).to(heads.dtype)


def rotate(v: Tensor, phi: Tensor, rotation: str) -> Tensor:
    """Rotate pairs of v (..., N) by phi (..., S): x0' = x0·c − x1·s, x1' = x0·s + x1·c.

    "pairwise" pairs (2i, 2i+1), "halves" pairs (i, i+N/2), for i < S; other dims pass.
    """
    n, s = v.shape[-1], phi.shape[-1]
    if s == 0:
        return v
    cos, sin = torch.cos(phi).to(v.dtype), torch.sin(phi).to(v.dtype)
    if rotation == "pairwise":
        pairs = v[..., : 2 * s].unflatten(-1, (s, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        turned = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return torch.cat((turned, v[..., 2 * s :]), dim=-1)
    if rotation == "halves":
        half = n // 2
        x0, x1 = v[..., :s], v[..., half : half + s]
        return torch.cat(
            (x0 * cos - x1 * sin, v[..., s:half], x0 * sin + x1 * cos, v[..., half + s :]),
            dim=-1,
        )
    raise ValueError(f"rotation={rotation!r} is invalid; allowed: {ROTATIONS}")


def expand_x(x: Tensor, mimo_x: Tensor | None) -> Tensor:
    """x̃_r = mimo_x[h, r] ⊙ x: (..., H, P) -> (..., R, H, P); SISO is R=1 with no scaling."""
    x = x.to(compute_dtype(x.dtype))
    if mimo_x is None:
        return x.unsqueeze(-3)
    return x.unsqueeze(-3) * mimo_x.transpose(0, 1).to(x.dtype)


def token_outer(x: Tensor, k: Tensor, mimo_x: Tensor | None) -> Tensor:
    """Σ_r x̃_r k_rᵀ of one token: x (Bt, H, P), k (Bt, R, H, N) -> (Bt, H, P, N)."""
    xr = expand_x(x, mimo_x)
    dtype = torch.promote_types(xr.dtype, compute_dtype(k.dtype))
    return torch.einsum("brhp,brhn->bhpn", xr.to(dtype), k.to(dtype))


def gate_output(y: Tensor, z: Tensor, weights: Mamba3Weights, options: Mamba3Options) -> Tensor:
    """o = Σ_r mimo_o[h,r] ⊙ [norm(y_r)·w] ⊙ silu(mimo_z[h,r] ⊙ z).

    y: (..., R, H, P), z: (..., H, P) -> (..., H, P).
    """
    zr = z.to(y.dtype).unsqueeze(-3)
    if weights.mimo_z is not None:
        zr = zr * weights.mimo_z.transpose(0, 1).to(y.dtype)
    else:
        zr = zr.expand_as(y)
    if weights.out_norm is not None:
        headdim = y.shape[-1]
        gated = gated_rms_norm(
            y.flatten(-2),
            zr.flatten(-2),
            weights.out_norm.flatten(),
            options.out_norm_eps,
            group_size=headdim,
        ).unflatten(-1, y.shape[-2:])
    else:
        gated = y * F.silu(zr)
    if weights.mimo_o is not None:
        gated = gated * weights.mimo_o.transpose(0, 1).to(y.dtype)
    return gated.sum(-3)
