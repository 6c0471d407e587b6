"""Triton kernel for the Mamba-3 output stage, forward and backward: the D skip, the optional
pre-gate grouped RMSNorm (per head, Mamba-3's hybrid form), the silu gate and the MIMO sum:

    ŷ_r = y_r + D_h · mimo_x[h,r] ⊙ x
    o   = Σ_r mimo_o[h,r] ⊙ [RMSNorm(ŷ_r)·w_h] ⊙ silu(mimo_z[h,r] ⊙ z)

In PyTorch this is a dozen float32 passes over (tokens, R, H, P) tensors, forward and
backward, each saving its input for autograd; here one program per (token block, head) keeps
every rank in registers, writes o once, and its backward writes dy, dx, dz once plus per-block
partial sums for the parameters (summed by the caller). SISO is R=1 without the mimo tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.launch_args import pointer_or, token_major

BLOCK_TOKENS = 16
# MIMO backward: a program writes per-rank partial sums of three (H, R, P) weights, so larger
# token blocks cut that traffic, and each partial is a reduction over the block's tokens that
# crosses warps, so fewer warps cut those. Past ~32 values of a (BT, P) tile per thread the
# kernel spills, and with the pre-gate norm's per-rank tiles it spills at 32 tokens; unrolled
# over R = 8 the ranks' tiles overlap and it spills at any block, so there the rank loop stays
# a loop. H100, 8 × 2048, P 64, gradient of the gate alone, ms at 32 / 16 tokens (2 warps):
# R=2 0.73-0.79 / 0.79-0.82, with the norm 0.81-0.95 / 0.70-0.80; R=4 0.96-1.20 / 0.95-1.11,
# with the norm 3.27-3.42 / 1.22-1.32; R=8 unrolled 3.9 / 1.7, with the norm 28.3 / 6.2, as
# a loop 1.48 / 1.74, with the norm 2.15 / 2.07. 4 warps were slower everywhere. SISO and the
# forward are fastest at 16 tokens and 4 warps.
MIMO_BWD_WARPS = 2
MAX_UNROLLED_RANK = 4


def mimo_bwd_tokens(norm: bool) -> int:
    """Token block of the MIMO gate backward: 16 with the pre-gate norm, else 32."""
    return 16 if norm else 32


@triton.jit
def _rank_terms(y_ptr, x, z, d, mx_ptr, mz_ptr, w, rows, tmask, h, H, r,
                R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, offs, eps,
                HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr):  # fmt: skip
    """Rank r of one head: ŷ, its 1/rms, the normalised value, z̃ = mimo_z ⊙ z, σ(z̃)."""
    y = tl.load(y_ptr + ((rows * R + r) * H + h)[:, None] * P + offs[None, :],
                mask=tmask[:, None], other=0.0).to(tl.float32)  # fmt: skip
    if HAS_MIMO:
        mx = tl.load(mx_ptr + (h * R + r) * P + offs)
        zt = z * tl.load(mz_ptr + (h * R + r) * P + offs)[None, :]
    else:
        mx = tl.full([P], 1.0, tl.float32)
        zt = z
    yh = y + d * mx[None, :] * x
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(yh * yh, 1) / P + eps)
        normed = yh * rstd[:, None] * w[None, :]
    else:
        rstd = tl.full([BT], 1.0, tl.float32)
        normed = yh
    return yh, rstd, normed, zt, tl.sigmoid(zt), mx


@triton.jit
def _token_rows(x_ptr, z_ptr, rows, tmask, h, SX, SZ, offs, P: tl.constexpr):
    """Head h of x and z (float32); SX, SZ are their token strides (slices of in_proj)."""
    x = tl.load(x_ptr + (rows * SX + h * P)[:, None] + offs[None, :], mask=tmask[:, None],
                other=0.0).to(tl.float32)  # fmt: skip
    z = tl.load(z_ptr + (rows * SZ + h * P)[:, None] + offs[None, :], mask=tmask[:, None],
                other=0.0).to(tl.float32)  # fmt: skip
    return x, z


@triton.jit
def _gate_fwd_kernel(
    y_ptr, x_ptr, z_ptr, d_ptr, mx_ptr, mz_ptr, mo_ptr, w_ptr, out_ptr, T, H, SX, SZ, eps,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
    HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = rows < T
    offs = tl.arange(0, P)
    io = (rows * H + h)[:, None] * P + offs[None, :]
    x, z = _token_rows(x_ptr, z_ptr, rows, tmask, h, SX, SZ, offs, P)
    d = tl.load(d_ptr + h).to(tl.float32)
    w = tl.load(w_ptr + h * P + offs).to(tl.float32) if HAS_NORM else tl.zeros([P], tl.float32)
    acc = tl.zeros([BT, P], dtype=tl.float32)
    for r in tl.static_range(R):
        _, _, normed, zt, sig, _ = _rank_terms(y_ptr, x, z, d, mx_ptr, mz_ptr, w, rows, tmask,
                                               h, H, r, R, P, BT, offs, eps, HAS_MIMO,
                                               HAS_NORM)  # fmt: skip
        gated = normed * zt * sig
        if HAS_MIMO:
            gated = gated * tl.load(mo_ptr + (h * R + r) * P + offs)[None, :]
        acc += gated
    tl.store(out_ptr + io, acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _rank_backward(r, dx, dz, dw, dd, x, z, dout, d, w, y_ptr, mx_ptr, mz_ptr, mo_ptr, dy_ptr,
                   dmx_ptr, dmz_ptr, dmo_ptr, rows, tmask, blk, h, H, offs, eps,
                   R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
                   HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr):  # fmt: skip
    """Rank r's share of the gate backward: dy_r and the rank's weight partials stored, the
    running dx, dz, dw, dD returned."""
    yh, rstd, normed, zt, sig, mx = _rank_terms(y_ptr, x, z, d, mx_ptr, mz_ptr, w, rows, tmask,
                                                h, H, r, R, P, BT, offs, eps, HAS_MIMO,
                                                HAS_NORM)  # fmt: skip
    silu = zt * sig
    dgate = dout
    part = ((blk * H + h) * R + r) * P
    if HAS_MIMO:
        dgate = dout * tl.load(mo_ptr + (h * R + r) * P + offs)[None, :]
        tl.store(dmo_ptr + part + offs, tl.sum(dout * normed * silu, 0))
    dzt = dgate * normed * (sig + zt * sig * (1.0 - sig))
    dnormed = dgate * silu
    if HAS_MIMO:
        dz += dzt * tl.load(mz_ptr + (h * R + r) * P + offs)[None, :]
        tl.store(dmz_ptr + part + offs, tl.sum(dzt * z, 0))
    else:
        dz += dzt
    if HAS_NORM:
        xhat = yh * rstd[:, None]
        dw += tl.sum(dnormed * xhat, 0)
        g = dnormed * w[None, :]
        dyh = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, 1) / P)[:, None])
    else:
        dyh = dnormed
    tl.store(dy_ptr + ((rows * R + r) * H + h)[:, None] * P + offs[None, :],
             dyh.to(dy_ptr.dtype.element_ty), mask=tmask[:, None])  # fmt: skip
    dx += dyh * d * mx[None, :]
    dd += tl.sum(tl.sum(dyh * mx[None, :] * x, 1), 0)
    if HAS_MIMO:
        tl.store(dmx_ptr + part + offs, tl.sum(dyh * d * x, 0))
    return dx, dz, dw, dd


@triton.jit
def _gate_bwd_kernel(
    y_ptr, x_ptr, z_ptr, d_ptr, mx_ptr, mz_ptr, mo_ptr, w_ptr, do_ptr,
    dy_ptr, dx_ptr, dz_ptr, dd_ptr, dmx_ptr, dmz_ptr, dmo_ptr, dw_ptr, T, H, SX, SZ, eps,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
    HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr, ROLLED: tl.constexpr,
):  # fmt: skip
    """Partials (one row per token block): dD (blocks, H), dmimo_* (blocks, H, R, P) and
    dw (blocks, H, P). ROLLED keeps the rank loop a loop (unrolled, ranks' tiles overlap and
    spill at R = 8); otherwise `loop_unroll_factor` unrolls it whole (H100: within the
    ±8% spread of `tl.static_range`, results bit-identical)."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    rows = (blk * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = rows < T
    offs = tl.arange(0, P)
    io = (rows * H + h)[:, None] * P + offs[None, :]
    x, z = _token_rows(x_ptr, z_ptr, rows, tmask, h, SX, SZ, offs, P)
    dout = tl.load(do_ptr + io, mask=tmask[:, None], other=0.0).to(tl.float32)
    d = tl.load(d_ptr + h).to(tl.float32)
    w = tl.load(w_ptr + h * P + offs).to(tl.float32) if HAS_NORM else tl.zeros([P], tl.float32)
    dx = tl.zeros([BT, P], dtype=tl.float32)
    dz = tl.zeros([BT, P], dtype=tl.float32)
    dw = tl.zeros([P], dtype=tl.float32)
    dd = tl.sum(tl.zeros([P], dtype=tl.float32), 0)
    for r in tl.range(R, loop_unroll_factor=1 if ROLLED else R):
        dx, dz, dw, dd = _rank_backward(r, dx, dz, dw, dd, x, z, dout, d, w, y_ptr, mx_ptr,
                                        mz_ptr, mo_ptr, dy_ptr, dmx_ptr, dmz_ptr, dmo_ptr,
                                        rows, tmask, blk, h, H, offs, eps, R, P, BT,
                                        HAS_MIMO, HAS_NORM)  # fmt: skip
    tl.store(dx_ptr + io, dx.to(dx_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(dz_ptr + io, dz.to(dz_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(dd_ptr + blk * H + h, dd)
    if HAS_NORM:
        tl.store(dw_ptr + (blk * H + h) * P + offs, dw)


class Mamba3Gate(torch.autograd.Function):
    """o (T, H, P) from y (T, R, H, P), x and z (T, H, P) and the layer's output weights."""

    @staticmethod
    def forward(ctx, y, x, z, d, mimo_x, mimo_z, mimo_o, norm_w, eps):
        tokens, rank, heads, p = y.shape
        out = torch.empty(tokens, heads, p, device=y.device, dtype=x.dtype)
        grid = (triton.cdiv(tokens, BLOCK_TOKENS), heads)
        _gate_fwd_kernel[grid](
            y, x, z, d, *(pointer_or(w, d) for w in (mimo_x, mimo_z, mimo_o, norm_w)), out,
            tokens, heads, x.stride(0), z.stride(0), eps, R=rank, P=p, BT=BLOCK_TOKENS,
            HAS_MIMO=mimo_x is not None, HAS_NORM=norm_w is not None, enable_fp_fusion=True,
        )  # fmt: skip
        ctx.save_for_backward(y, x, z, d, mimo_x, mimo_z, mimo_o, norm_w)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        y, x, z, d, mimo_x, mimo_z, mimo_o, norm_w = ctx.saved_tensors
        tokens, rank, heads, p = y.shape
        mimo, norm = mimo_x is not None, norm_w is not None
        bt = mimo_bwd_tokens(norm) if rank > 1 else BLOCK_TOKENS
        blocks = triton.cdiv(tokens, bt)
        f32 = {"device": y.device, "dtype": torch.float32}
        dy = torch.empty_like(y)
        dx, dz = (torch.empty(tokens, heads, p, device=y.device, dtype=t.dtype) for t in (x, z))
        dd = torch.empty(blocks, heads, **f32)
        per_rank = [torch.empty(blocks, heads, rank, p, **f32) if mimo else dd for _ in range(3)]
        dw = torch.empty(blocks, heads, p, **f32) if norm else dd
        _gate_bwd_kernel[(blocks, heads)](
            y, x, z, d, *(pointer_or(w, d) for w in (mimo_x, mimo_z, mimo_o, norm_w)),
            dout.contiguous(), dy, dx, dz, dd, *per_rank, dw, tokens, heads, x.stride(0),
            z.stride(0), ctx.eps,
            R=rank, P=p, BT=bt, HAS_MIMO=mimo, HAS_NORM=norm, ROLLED=rank > MAX_UNROLLED_RANK,
            num_warps=MIMO_BWD_WARPS if rank > 1 else 4, enable_fp_fusion=True,
        )  # fmt: skip
        dmx, dmz, dmo = (t.sum(0) if mimo else None for t in per_rank)
        return dy, dx, dz, dd.sum(0), dmx, dmz, dmo, dw.sum(0) if norm else None, None


def mamba3_gate(
    y: Tensor,
    x: Tensor,
    z: Tensor,
    d: Tensor,
    mimo_x: Tensor | None,
    mimo_z: Tensor | None,
    mimo_o: Tensor | None,
    norm_w: Tensor | None,
    eps: float,
) -> Tensor:
    """Differentiable; y (T, R, H, P), x, z (T, H, P) (any token stride), d (H,), mimo_*
    (H, R, P) (all three or none), norm_w (H, P) or None. Returns o (T, H, P) in x's dtype."""

    def prepared(t: Tensor | None) -> Tensor | None:
        return t.float().contiguous() if t is not None else None

    return Mamba3Gate.apply(
        y.contiguous(), token_major(x), token_major(z), prepared(d), prepared(mimo_x),
        prepared(mimo_z), prepared(mimo_o), prepared(norm_w), eps,
    )  # fmt: skip
