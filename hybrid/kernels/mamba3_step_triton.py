"""Triton kernel for the one-token Mamba-3 update (MAMBA3.md §4), SISO and MIMO.

One program per (sequence, head) does the whole token in registers: Δ, A, λ and the trapezoidal
coefficients; the angle update (wrapped) and the rotation of the normalised, biased B and C;
the update of the cache's H⁻ = H − γ Σ_r x̃_r k_rᵀ (see `Mamba3State`), α·H⁻ + (α γ_prev + β)
Σ_r x̃_prev,r k_prev,rᵀ, written in place; y_r = H⁻ q_r + γ Σ_r' x̃_r' (k_r'·q_r) + D x̃_r (at
R > 2 through H = H⁻ + γ Σ_r x̃_r k_rᵀ, formed in registers after the store); the optional
pre-gate RMSNorm, the silu(mimo_z ⊙ z) gate and the mimo_o sum; and the cache's new k, x and γ.
The state is read and written once: the kernel is meant to run at memory bandwidth. headdim,
d_state and rank must be powers of two.

The ranks are unrolled loops over the (P, N) state tile, one adding each rank's outer products
to it and one reading each y_r from it, with small programs (64 state values a thread): (R, P,
N) products summed over R, on 4-8 warps, ran MIMO R=4 at 13-31% of copy bandwidth on an H100
and SISO at 38-67%; this form takes 1.3-3.4× less time (see BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.dependent_launch import chained, wait_for_predecessor
from hybrid.kernels.launch_args import pointer_or, token_major
from hybrid.kernels.mamba3_common import (
    Mamba3Inputs,
    Mamba3Options,
    Mamba3State,
    Mamba3Weights,
    is_power_of_two,
)
from hybrid.kernels.triton_math import (
    PI,
    a_coefficient,
    cos_sin_wrapped,
    softplus,
    tanh,
    wrap_angle,
)

MAX_TILED_RANK = tl.constexpr(2)  # above it, y's γ term goes through the state (see the kernel)


@triton.jit
def _angles(st_ang_ptr, ang_ptr, offs, mask, delta):
    """Accumulated angle at index offs (< S): φ + Δ·π·tanh(angle), wrapped to [0, 2π)
    (ang_ptr at the sequence's raw angles)."""
    raw = tl.load(ang_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    theta = tanh(raw) * PI
    phi = tl.load(st_ang_ptr + offs, mask=mask, other=0.0).to(tl.float32) + delta * theta
    return wrap_angle(phi)


@triton.jit
def _rotated_row(v_ptr, w_ptr, bias_ptr, offs_n, partner, cos_n, sin_n, eps, N: tl.constexpr):
    """One rank's RMSNorm(v)·w + bias (v_ptr, bias_ptr at the rank's row), rotated: each
    dimension mixed with its pair `partner` by (cos_n, sin_n) (sin_n signed per side)."""
    raw = tl.load(v_ptr + offs_n).to(tl.float32)
    raw_p = tl.load(v_ptr + partner).to(tl.float32)
    rs = 1.0 / tl.sqrt(tl.sum(raw * raw, axis=0) / N + eps)
    w = tl.load(w_ptr + offs_n).to(tl.float32)
    w_p = tl.load(w_ptr + partner).to(tl.float32)
    v = raw * rs * w + tl.load(bias_ptr + offs_n).to(tl.float32)
    v_p = raw_p * rs * w_p + tl.load(bias_ptr + partner).to(tl.float32)
    return v * cos_n + v_p * sin_n


@triton.jit
def _mimo_row(w_ptr, h, r, R: tl.constexpr, P: tl.constexpr, HAS_MIMO: tl.constexpr):
    """mimo_{x,z,o}[h, r] as float32 (P,), or ones without MIMO."""
    if HAS_MIMO:
        return tl.load(w_ptr + (h * R + r) * P + tl.arange(0, P)).to(tl.float32)
    return tl.full((P,), 1.0, tl.float32)


@triton.jit
def _mamba3_step_kernel(
    x_ptr,
    z_ptr,
    b_ptr,
    c_ptr,
    dt_ptr,
    a_ptr,
    trap_ptr,
    ang_ptr,
    dt_bias_ptr,
    bnw_ptr,
    cnw_ptr,
    bb_ptr,
    cb_ptr,
    d_ptr,
    mx_ptr,
    mz_ptr,
    mo_ptr,
    onw_ptr,
    st_ang_ptr,
    st_ssm_ptr,
    st_k_ptr,
    st_x_ptr,
    st_gamma_ptr,
    out_ptr,
    x_stride,
    z_stride,
    b_stride,
    c_stride,
    dt_stride,
    a_stride,
    trap_stride,
    ang_stride,
    H,
    G,
    S,
    heads_per_group,
    a_floor,
    bc_eps,
    out_eps,
    P: tl.constexpr,
    N: tl.constexpr,
    R: tl.constexpr,
    S_BLOCK: tl.constexpr,
    HALVES: tl.constexpr,
    HEAVY_TAIL: tl.constexpr,
    HAS_MIMO: tl.constexpr,
    HAS_NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)  # every input but the weights comes from earlier kernels
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = h // heads_per_group
    bh = b * H + h
    offs_p = tl.arange(0, P)
    offs_n = tl.arange(0, N)

    # discretisation
    dt = tl.load(dt_ptr + b * dt_stride + h).to(tl.float32)
    delta = softplus(dt + tl.load(dt_bias_ptr + h).to(tl.float32))
    big_a, _ = a_coefficient(tl.load(a_ptr + b * a_stride + h).to(tl.float32), a_floor, HEAVY_TAIL)
    lam = tl.sigmoid(tl.load(trap_ptr + b * trap_stride + h).to(tl.float32))
    alpha = tl.exp(delta * big_a)
    beta = (1.0 - lam) * delta * alpha
    gamma = lam * delta
    prev_coeff = alpha * tl.load(st_gamma_ptr + bh) + beta  # of the cached token's Σ x̃ kᵀ

    # angles: the new state, and the angle of every rotated dimension
    offs_s = tl.arange(0, S_BLOCK)
    smask = offs_s < S
    st_ang = st_ang_ptr + bh * S
    ang_row = ang_ptr + b * ang_stride
    phi_s = _angles(st_ang, ang_row, offs_s, smask, delta)
    if HALVES:
        first = offs_n < S
        second = (offs_n >= N // 2) & (offs_n < N // 2 + S)
        rotated = first | second
        j = tl.where(first, offs_n, offs_n - N // 2)
        partner = tl.where(first, offs_n + N // 2, offs_n - N // 2)
        sign = tl.where(first, -1.0, 1.0)
    else:
        rotated = offs_n < 2 * S
        j = offs_n // 2
        partner = offs_n ^ 1
        sign = tl.where(offs_n % 2 == 0, -1.0, 1.0)
    j = tl.where(rotated, j, 0)
    partner = tl.where(rotated, partner, offs_n)
    cos_w, sin_w = cos_sin_wrapped(_angles(st_ang, ang_row, j, rotated, delta))
    cos_n = tl.where(rotated, cos_w, 1.0)
    sin_n = tl.where(rotated, sin_w, 0.0) * sign

    x = tl.load(x_ptr + b * x_stride + h * P + offs_p).to(tl.float32)
    x_prev = tl.load(st_x_ptr + bh * P + offs_p).to(tl.float32)
    z = tl.load(z_ptr + b * z_stride + h * P + offs_p).to(tl.float32)
    row_b = b_ptr + b * b_stride + g * N  # rank r's row: + r·G·N
    row_c = c_ptr + b * c_stride + g * N
    bias_b = bb_ptr + h * R * N  # rank r's bias: + r·N
    bias_c = cb_ptr + h * R * N
    k_rows = st_k_ptr + (b * R * H + h) * N  # rank r's cached k: + r·H·N

    # H⁻ update, in place: α·H⁻ + (α γ_prev + β) Σ_r x̃_prev,r k_prev,rᵀ. y's γ term
    # Σ_r' x̃_r' (k_r'·q_r) comes from (R, N) and (R, P) tiles of the new k_r and mimo_x rows
    # or, at R > MAX_TILED_RANK, where the tiles cost more than R more products (H100, bf16
    # state, R=4: 14-27% slower), from those products added to the state after its store
    ssm_off = (bh * P + offs_p[:, None]) * N + offs_n[None, :]
    state = alpha * tl.load(st_ssm_ptr + ssm_off).to(tl.float32)
    offs_r = tl.arange(0, R)
    k_all = tl.zeros((R, N), dtype=tl.float32)
    mx_all = tl.zeros((R, P), dtype=tl.float32)
    for r in tl.static_range(R):
        if R <= MAX_TILED_RANK:  # formed before the update (after it: up to 1.3× the time)
            k = _rotated_row(row_b + r * G * N, bnw_ptr, bias_b + r * N, offs_n, partner,
                             cos_n, sin_n, bc_eps, N)  # fmt: skip
        k_prev = tl.load(k_rows + r * H * N + offs_n).to(tl.float32)
        mx = _mimo_row(mx_ptr, h, r, R, P, HAS_MIMO)
        state += (prev_coeff * mx * x_prev)[:, None] * k_prev[None, :]
        if R <= MAX_TILED_RANK:
            k_all = tl.where(offs_r[:, None] == r, k[None, :], k_all)
            mx_all = tl.where(offs_r[:, None] == r, mx[None, :], mx_all)
            tl.debug_barrier()  # every thread has read k_prev,r before its row is overwritten
            tl.store(k_rows + r * H * N + offs_n, k.to(st_k_ptr.dtype.element_ty))
    tl.store(st_ssm_ptr + ssm_off, state.to(st_ssm_ptr.dtype.element_ty))
    if R > MAX_TILED_RANK:
        tl.debug_barrier()  # every thread has read the cached k rows before they are overwritten
        for r in tl.static_range(R):
            k = _rotated_row(row_b + r * G * N, bnw_ptr, bias_b + r * N, offs_n, partner,
                             cos_n, sin_n, bc_eps, N)  # fmt: skip
            tl.store(k_rows + r * H * N + offs_n, k.to(st_k_ptr.dtype.element_ty))
            state += (gamma * _mimo_row(mx_ptr, h, r, R, P, HAS_MIMO) * x)[:, None] * k[None, :]

    # output: y_r = H q_r + D x̃_r (H = H⁻ + γ Σ_r' x̃_r' k_r'ᵀ), optional per-head RMSNorm,
    # gate, rank sum
    d = tl.load(d_ptr + h).to(tl.float32)
    if HAS_NORM:
        w = tl.load(onw_ptr + h * P + offs_p).to(tl.float32)
    out = tl.zeros((P,), dtype=tl.float32)
    for r in tl.static_range(R):
        q = _rotated_row(row_c + r * G * N, cnw_ptr, bias_c + r * N, offs_n, partner, cos_n,
                         sin_n, bc_eps, N)  # fmt: skip
        x_coeff = d * _mimo_row(mx_ptr, h, r, R, P, HAS_MIMO)
        if R <= MAX_TILED_RANK:
            x_coeff += gamma * tl.sum(tl.sum(k_all * q[None, :], axis=1)[:, None] * mx_all, 0)
        y = tl.sum(state * q[None, :], axis=1) + x_coeff * x
        if HAS_NORM:
            y = y / tl.sqrt(tl.sum(y * y, axis=0) / P + out_eps) * w
        zr = _mimo_row(mz_ptr, h, r, R, P, HAS_MIMO) * z
        out += y * zr * tl.sigmoid(zr) * _mimo_row(mo_ptr, h, r, R, P, HAS_MIMO)
    tl.store(out_ptr + bh * P + offs_p, out.to(out_ptr.dtype.element_ty))

    # the rest of the cache: angle and γ (read at the start), raw x
    tl.debug_barrier()
    tl.store(st_ang + offs_s, phi_s, mask=smask)
    tl.store(st_gamma_ptr + bh, gamma)
    tl.store(st_x_ptr + bh * P + offs_p, x.to(st_x_ptr.dtype.element_ty))


def supports(token: Mamba3Inputs, state: Mamba3State) -> bool:
    """Shapes the kernel handles (powers of two), a contiguous state, and no autograd."""
    headdim = token.x.shape[-1]
    rank, d_state = token.b.shape[1], token.b.shape[-1]
    tensors = (*token, *state.tensors())
    return (
        is_power_of_two(headdim)
        and is_power_of_two(d_state)
        and is_power_of_two(rank)
        and d_state >= 2
        and all(t.is_contiguous() for t in state.tensors())
        and not any(t.requires_grad for t in tensors)
    )


def mamba3_step_triton(
    token: Mamba3Inputs, weights: Mamba3Weights, options: Mamba3Options, state: Mamba3State
) -> Tensor:
    """Advance `state` in place by one token; returns o (Bt, H, P) in x's dtype."""
    token = Mamba3Inputs(*(token_major(t) for t in token))  # in_proj slices: no copy
    batch, n_heads, headdim = token.x.shape
    rank, n_groups, d_state = token.b.shape[1], token.b.shape[2], token.b.shape[3]
    n_angles = token.angle.shape[-1]
    out = torch.empty(token.x.shape, dtype=token.x.dtype, device=token.x.device)  # dense
    mimo = weights.mimo_x is not None
    pdl = chained(out, batch)
    _mamba3_step_kernel[(batch, n_heads)](
        token.x,
        token.z,
        token.b,
        token.c,
        token.dt,
        token.a,
        token.trap,
        token.angle,
        weights.dt_bias,
        weights.b_norm,
        weights.c_norm,
        weights.b_bias.contiguous(),
        weights.c_bias.contiguous(),
        weights.d,
        *(
            pointer_or(w, weights.d)
            for w in (weights.mimo_x, weights.mimo_z, weights.mimo_o, weights.out_norm)
        ),
        state.angle,
        state.ssm,
        state.k,
        state.x,
        state.gamma,
        out,
        *(t.stride(0) for t in token),
        n_heads,
        n_groups,
        n_angles,
        n_heads // n_groups,
        options.a_floor,
        options.bc_norm_eps,
        options.out_norm_eps,
        P=headdim,
        N=d_state,
        R=rank,
        S_BLOCK=max(1, triton.next_power_of_2(max(n_angles, 1))),
        HALVES=options.rotation == "halves",
        HEAVY_TAIL=options.a_activation == "heavy_tail",
        HAS_MIMO=mimo,
        HAS_NORM=weights.out_norm is not None,
        PDL=pdl,
        launch_pdl=pdl,
        # 64 state values a thread (H100, batch 128, 64 heads × 64: 2 warps at N=64 and 4 at
        # N=128 took 1.0-4.0× less time than 4 and 8 for R=1-4; fewer warps spill)
        num_warps=min(16, max(2, headdim * d_state // 2048)),
        enable_fp_fusion=True,
    )
    return out
