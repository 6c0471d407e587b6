"""Per-token coefficients of the Mamba-3 prefill in Triton: Δ, log α, γ, β', the two-band
scale γ + β'_next, and the accumulated rotation angles φ, forward and backward.

Element-wise in PyTorch these were ~20 small launches forward and ~35 backward plus a
(T, H, S) float32 angle-increment tensor written, re-read and reduced twice: at training
shapes the GPU idled waiting for the host. Here one kernel computes every (token, head)
coefficient and θ = π·tanh(angle); the per-sequence angle sums read Δ_t,h·θ_t,s on the fly
(`chunked_cumsum`); the backward is the reverse angle sum and one
kernel that reduces its (T, H, S) gradient over S (for Δ) and over heads (for θ) in
registers. Definitions follow `mamba3_common.discretise` and `angle_increments`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.chunked_cumsum import chunked_cumsum
from hybrid.kernels.launch_args import token_major
from hybrid.kernels.projection_grads import gradient_output
from hybrid.kernels.segment_cumsum import segment_cumsum
from hybrid.kernels.triton_math import PI, a_coefficient, softplus, tanh

TILE = 4096  # (tokens × padded heads × padded angles) elements per program


@triton.jit
def _delta_lambda(dt_ptr, trap_ptr, offs, mask, bias):
    """Δ = softplus(dt + dt_bias), λ = sigmoid(trap), and softplus' (for the backward)."""
    u = tl.load(dt_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    lam = tl.sigmoid(tl.load(trap_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    return softplus(u), lam, tl.sigmoid(u)


@triton.jit
def _tile(pid, T, H, S, SH, SA, BT: tl.constexpr, HP: tl.constexpr, SP: tl.constexpr):
    """Offsets of a token block: (token, head) and (token, angle) in the outputs (th, ts)
    and in the raw inputs (ih, ia: token strides SH for dt, a, trap and SA for angle)."""
    rows = (pid * BT + tl.arange(0, BT)).to(tl.int64)
    heads = tl.arange(0, HP)
    angles = tl.arange(0, SP)
    rmask = rows < T
    th = rows[:, None] * H + heads[None, :]
    ih = rows[:, None] * SH + heads[None, :]
    mask = rmask[:, None] & (heads < H)[None, :]
    ts = rows[:, None] * S + angles[None, :]
    ia = rows[:, None] * SA + angles[None, :]
    smask = rmask[:, None] & (angles < S)[None, :]
    return rows, heads, rmask, th, ih, mask, ts, ia, smask


@triton.jit
def _coef_fwd_kernel(
    dt_ptr, a_ptr, trap_ptr, ang_ptr, bias_ptr, last_ptr,
    la_ptr, scale_ptr, gamma_ptr, betaf_ptr, delta_ptr, theta_ptr,
    T, H, S, SH, SA, a_floor,
    BT: tl.constexpr, HP: tl.constexpr, SP: tl.constexpr, HEAVY_TAIL: tl.constexpr,
):  # fmt: skip
    rows, heads, rmask, th, ih, mask, ts, ia, smask = _tile(tl.program_id(0), T, H, S, SH, SA,
                                                            BT, HP, SP)  # fmt: skip
    bias = tl.load(bias_ptr + heads, mask=heads < H, other=0.0).to(tl.float32)
    delta, lam, _ = _delta_lambda(dt_ptr, trap_ptr, ih, mask, bias)
    a, _ = a_coefficient(tl.load(a_ptr + ih, mask=mask, other=0.0).to(tl.float32), a_floor,
                          HEAVY_TAIL)  # fmt: skip
    # β' of the next token joins this token's scale, except at a sequence's last token
    last = tl.load(last_ptr + rows, mask=rmask, other=1) != 0
    next_mask = mask & (~last)[:, None]
    delta_next, lam_next, _ = _delta_lambda(dt_ptr, trap_ptr, ih + SH, next_mask, bias)
    beta_next = tl.where(next_mask, (1.0 - lam_next) * delta_next, 0.0)
    tl.store(la_ptr + th, delta * a, mask=mask)
    tl.store(gamma_ptr + th, lam * delta, mask=mask)
    tl.store(betaf_ptr + th, (1.0 - lam) * delta, mask=mask)
    tl.store(scale_ptr + th, lam * delta + beta_next, mask=mask)
    tl.store(delta_ptr + th, delta, mask=mask)
    raw = tl.load(ang_ptr + ia, mask=smask, other=0.0).to(tl.float32)
    tl.store(theta_ptr + ts, tanh(raw) * PI, mask=smask)


@triton.jit
def _coef_bwd_kernel(
    dt_ptr, a_ptr, trap_ptr, ang_ptr, bias_ptr, last_ptr,
    dla_ptr, dscale_ptr, dgamma_ptr, dbetaf_ptr, dinc_ptr,
    ddt_ptr, da_ptr, dtrap_ptr, dang_ptr, dbias_ptr,
    T, H, S, SH, SA, SDH, SDA, a_floor,
    BT: tl.constexpr, HP: tl.constexpr, SP: tl.constexpr, HEAVY_TAIL: tl.constexpr,
):  # fmt: skip
    """Gradients of the raw inputs, stored in their dtype (token strides SDH for ddt, da,
    dtrap and SDA for dangle: they may be slices of in_proj's gradient), and per-block
    dt_bias partials."""
    pid = tl.program_id(0)
    rows, heads, rmask, th, ih, mask, _, ia, smask = _tile(pid, T, H, S, SH, SA, BT, HP, SP)
    oh = rows[:, None] * SDH + heads[None, :]
    angles = tl.arange(0, SP)
    bias = tl.load(bias_ptr + heads, mask=heads < H, other=0.0).to(tl.float32)
    delta, lam, dsoftplus = _delta_lambda(dt_ptr, trap_ptr, ih, mask, bias)
    a, da_draw = a_coefficient(tl.load(a_ptr + ih, mask=mask, other=0.0).to(tl.float32),
                                a_floor, HEAVY_TAIL)  # fmt: skip
    raw = tl.load(ang_ptr + ia, mask=smask, other=0.0).to(tl.float32)
    tanh_angle = tanh(raw)
    dla = tl.load(dla_ptr + th, mask=mask, other=0.0)
    dgamma = tl.load(dgamma_ptr + th, mask=mask, other=0.0) + tl.load(
        dscale_ptr + th, mask=mask, other=0.0
    )
    dbetaf = tl.load(dbetaf_ptr + th, mask=mask, other=0.0)
    # this token's β' also sits in the previous token's scale (same sequence only)
    prev_last = tl.load(last_ptr + rows - 1, mask=rmask & (rows > 0), other=1) != 0
    prev_mask = mask & (~prev_last)[:, None]
    dbetaf += tl.load(dscale_ptr + th - H, mask=prev_mask, other=0.0)
    # increments Δ_h·θ_s: reduce their gradient over angles (for Δ) and heads (for θ)
    inc_offs = th[:, :, None] * S + angles[None, None, :]
    inc_mask = mask[:, :, None] & (angles < S)[None, None, :]
    dinc = tl.load(dinc_ptr + inc_offs, mask=inc_mask, other=0.0)
    ddelta = dla * a + dgamma * lam + dbetaf * (1.0 - lam)
    ddelta += tl.sum(dinc * (tanh_angle * PI)[:, None, :], 2)
    dtheta = tl.sum(dinc * delta[:, :, None], 1)
    ddt = ddelta * dsoftplus
    tl.store(ddt_ptr + oh, ddt, mask=mask)
    tl.store(da_ptr + oh, dla * delta * da_draw, mask=mask)
    tl.store(dtrap_ptr + oh, (dgamma - dbetaf) * delta * lam * (1.0 - lam), mask=mask)
    tl.store(dang_ptr + rows[:, None] * SDA + angles[None, :],
             dtheta * PI * (1.0 - tanh_angle * tanh_angle), mask=smask)  # fmt: skip
    tl.store(dbias_ptr + pid * HP + heads, tl.sum(ddt, 0))


def _tiling(heads: int, angles: int) -> tuple[int, int, int]:
    hp, sp = triton.next_power_of_2(heads), triton.next_power_of_2(max(angles, 1))
    return max(1, TILE // (hp * sp)), hp, sp


class Mamba3Coefficients(torch.autograd.Function):
    """(log α, scale, γ, β', φ) from the raw dt, a, trap, angle inputs; see the module."""

    @staticmethod
    def forward(ctx, dt, a, trap, angle, dt_bias, angle0, table, heavy_tail, floor, grads):
        tokens, heads = dt.shape
        n_angles = angle.shape[1]
        bt, hp, sp = _tiling(heads, n_angles)
        f32 = {"device": dt.device, "dtype": torch.float32}
        log_alpha, scale, gamma, beta_free, delta = (
            torch.empty(tokens, heads, **f32) for _ in range(5)
        )
        theta = torch.empty(tokens, n_angles, **f32)
        _coef_fwd_kernel[(triton.cdiv(tokens, bt),)](
            dt, a, trap, angle, dt_bias, table.last_token, log_alpha, scale, gamma, beta_free,
            delta, theta, tokens, heads, n_angles, dt.stride(0), angle.stride(0), floor,
            BT=bt, HP=hp, SP=sp, HEAVY_TAIL=heavy_tail, enable_fp_fusion=True,
        )  # fmt: skip
        phi = chunked_cumsum((delta, theta), table, angle0, wrap=True)
        ctx.save_for_backward(dt, a, trap, angle, dt_bias)
        ctx.table, ctx.heavy_tail, ctx.floor, ctx.grads = table, heavy_tail, floor, grads
        ctx.has_angle0 = angle0 is not None
        return log_alpha, scale, gamma, beta_free, phi

    @staticmethod
    def backward(ctx, dla, dscale, dgamma, dbetaf, dphi):
        dt, a, trap, angle, dt_bias = ctx.saved_tensors
        last, seq_starts = ctx.table.last_token, ctx.table.seq_starts
        tokens, heads = dt.shape
        n_angles = angle.shape[1]
        bt, hp, sp = _tiling(heads, n_angles)
        blocks = triton.cdiv(tokens, bt)

        def given(g: Tensor | None, *shape) -> Tensor:
            return g.float().contiguous() if g is not None else dt.new_zeros(shape).float()

        dinc = given(dphi, tokens, heads, n_angles)
        dinc = segment_cumsum(dinc, seq_starts, reverse=True)
        # ddt, da and dtrap share a token stride, as dt, a and trap do
        ddt, da, dtrap, dangle = (
            gradient_output(ctx.grads, name, t.shape, t)
            for name, t in (("dt", dt), ("a", a), ("trap", trap), ("angle", angle))
        )
        dbias = torch.empty(blocks, hp, device=dt.device, dtype=torch.float32)
        _coef_bwd_kernel[(blocks,)](
            dt, a, trap, angle, dt_bias, last,
            given(dla, tokens, heads), given(dscale, tokens, heads),
            given(dgamma, tokens, heads), given(dbetaf, tokens, heads), dinc,
            ddt, da, dtrap, dangle, dbias, tokens, heads, n_angles, dt.stride(0),
            angle.stride(0), ddt.stride(0), dangle.stride(0), ctx.floor,
            BT=bt, HP=hp, SP=sp, HEAVY_TAIL=ctx.heavy_tail, enable_fp_fusion=True,
        )  # fmt: skip
        dangle0 = dinc[seq_starts[:-1].long()] if ctx.has_angle0 else None
        return (
            ddt, da, dtrap, dangle, dbias.sum(0)[:heads].to(dt_bias.dtype), dangle0,
            None, None, None, None,
        )  # fmt: skip


def mamba3_coefficients(
    dt, a, trap, angle, dt_bias, angle0, table: ChunkTable, options, grads=None
):
    """dt, a, trap (T, H), angle (T, S) raw (any token strides; dt, a, trap share one);
    dt_bias (H,); angle0 (n_seq, H, S) or None; the batch's layout `table`; with `grads`
    (the raw inputs are its pieces "dt", "a", "trap", "angle") their gradients are written
    into that buffer. Returns float32 log α, scale = γ + β'_next, γ, β' (T, H) and wrapped
    φ (T, H, S)."""
    dt, a, trap = (token_major(t) for t in (dt, a, trap))
    if not dt.stride(0) == a.stride(0) == trap.stride(0):
        dt, a, trap = (t.contiguous() for t in (dt, a, trap))
    return Mamba3Coefficients.apply(
        dt, a, trap, token_major(angle),
        dt_bias.contiguous(), angle0.float().contiguous() if angle0 is not None else None,
        table, options.a_activation == "heavy_tail", options.a_floor, grads,
    )  # fmt: skip
