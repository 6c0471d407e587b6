"""Triton kernel for the Mamba-3 output stage, forward and backward: the optional pre-gate
grouped RMSNorm (per head, Mamba-3's hybrid form), the silu gate and the MIMO sum of the
scan's outputs y_r (the D skip, y_r = H q_r + D·x̃_r, is the scan's: `mamba3_prefill_core`):

    o = Σ_r mimo_o[h,r] ⊙ [RMSNorm(y_r)·w_h] ⊙ silu(mimo_z[h,r] ⊙ z)

In PyTorch this is a dozen float32 passes over (tokens, R, H, P) tensors, forward and
backward, each saving its input for autograd; here one program per (token block, head) keeps
every rank in registers, writes o once, and its backward writes dy and dz once plus per-block
partial sums for the parameters (summed by the caller). SISO is R=1 without the mimo tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.launch_args import pointer_or, token_major
from hybrid.kernels.projection_grads import ProjectionGrads, gradient_output

BLOCK_TOKENS = 16
# MIMO backward: a program writes per-rank partial sums of (H, R, P) weights, and each is a
# reduction over the block's tokens that crosses warps, so fewer warps cut those; unrolled over
# R > 2 the ranks' tiles overlap and spill (most with the pre-gate norm's per-rank tiles), so
# there the rank loop stays a loop. H100, 8 × 2048, P 64, bf16, the gradient of the gate alone,
# us, as it was (R=2 and R=4: 2 warps, 32 tokens, 16 with the norm, unrolled; R=8 rolled) ->
# now (R=2: 32 tokens, 2 warps, unrolled; R > 2: 16 tokens, 1 warp, rolled), from a sweep of
# 16/32 tokens × 1/2/4 warps × rolled or not: R=2 216 -> 216, with the norm 264 -> 242; R=4
# 376 -> 369, with the norm 602 -> 433; R=8 686 -> 658, with the norm 969 -> 798. SISO and the
# forward are fastest at 16 tokens and 4 warps (within 1-5% of every other option).
MAX_UNROLLED_RANK = 2
UNROLLED_BWD_TILING = (32, 2)  # (tokens, warps) at 1 < R <= MAX_UNROLLED_RANK
ROLLED_BWD_TILING = (16, 1)


@triton.jit
def _rank_terms(y_ptr, z, mz_ptr, w, rows, tmask, h, H, r,
                R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, offs, eps,
                HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr):  # fmt: skip
    """Rank r of one head: y, its 1/rms, the normalised value, z̃ = mimo_z ⊙ z, σ(z̃)."""
    yh = tl.load(y_ptr + ((rows * R + r) * H + h)[:, None] * P + offs[None, :],
                 mask=tmask[:, None], other=0.0).to(tl.float32)  # fmt: skip
    zt = z * tl.load(mz_ptr + (h * R + r) * P + offs).to(tl.float32)[None, :] if HAS_MIMO else z
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(yh * yh, 1) / P + eps)
        normed = yh * rstd[:, None] * w[None, :]
    else:
        rstd = tl.full([BT], 1.0, tl.float32)
        normed = yh
    return yh, rstd, normed, zt, tl.sigmoid(zt)


@triton.jit
def gate_rows(y, z, mz, mo, w, eps, P: tl.constexpr, HAS_MIMO: tl.constexpr,
              HAS_NORM: tl.constexpr):  # fmt: skip
    """[RMSNorm(y)·w] ⊙ silu(mz ⊙ z) ⊙ mo of (rows, P) float32 tiles (mz, mo, w broadcast
    over the rows; mz and mo unused without HAS_MIMO, w without HAS_NORM)."""
    if HAS_NORM:
        y = y * tl.rsqrt(tl.sum(y * y, 1) / P + eps)[:, None] * w
    zt = z * mz if HAS_MIMO else z
    gated = y * zt * tl.sigmoid(zt)
    return gated * mo if HAS_MIMO else gated


@triton.jit
def _token_z(z_ptr, rows, tmask, h, SZ, offs, P: tl.constexpr):
    """Head h of z (float32); SZ is its token stride (a slice of in_proj)."""
    return tl.load(z_ptr + (rows * SZ + h * P)[:, None] + offs[None, :], mask=tmask[:, None],
                   other=0.0).to(tl.float32)  # fmt: skip


@triton.jit
def _gate_fwd_kernel(
    y_ptr, z_ptr, mz_ptr, mo_ptr, w_ptr, out_ptr, T, H, SZ, eps,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
    HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = rows < T
    offs = tl.arange(0, P)
    io = (rows * H + h)[:, None] * P + offs[None, :]
    z = _token_z(z_ptr, rows, tmask, h, SZ, offs, P)
    w = tl.load(w_ptr + h * P + offs).to(tl.float32) if HAS_NORM else tl.zeros([P], tl.float32)
    acc = tl.zeros([BT, P], dtype=tl.float32)
    for r in tl.static_range(R):
        yh = tl.load(y_ptr + ((rows * R + r) * H + h)[:, None] * P + offs[None, :],
                     mask=tmask[:, None], other=0.0).to(tl.float32)  # fmt: skip
        mz = tl.load(mz_ptr + (h * R + r) * P + offs).to(tl.float32) if HAS_MIMO else w
        mo = tl.load(mo_ptr + (h * R + r) * P + offs).to(tl.float32) if HAS_MIMO else w
        acc += gate_rows(yh, z, mz[None, :], mo[None, :], w[None, :], eps, P, HAS_MIMO,
                         HAS_NORM)  # fmt: skip
    tl.store(out_ptr + io, acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _rank_backward(r, dz, dw, z, dout, w, y_ptr, mz_ptr, mo_ptr, dy_ptr, dmz_ptr, dmo_ptr,
                   rows, tmask, blk, h, H, offs, eps, R: tl.constexpr, P: tl.constexpr,
                   BT: tl.constexpr, HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr):  # fmt: skip
    """Rank r's share of the gate backward: dy_r and the rank's weight partials stored, the
    running dz and dw returned."""
    yh, rstd, normed, zt, sig = _rank_terms(y_ptr, z, mz_ptr, w, rows, tmask, h, H, r, R, P, BT,
                                            offs, eps, HAS_MIMO, HAS_NORM)  # fmt: skip
    silu = zt * sig
    dgate = dout
    part = ((blk * H + h) * R + r) * P
    if HAS_MIMO:
        dgate = dout * tl.load(mo_ptr + (h * R + r) * P + offs).to(tl.float32)[None, :]
        tl.store(dmo_ptr + part + offs, tl.sum(dout * normed * silu, 0))
    dzt = dgate * normed * (sig + zt * sig * (1.0 - sig))
    dnormed = dgate * silu
    if HAS_MIMO:
        dz += dzt * tl.load(mz_ptr + (h * R + r) * P + offs).to(tl.float32)[None, :]
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
    return dz, dw


@triton.jit
def _gate_bwd_kernel(
    y_ptr, z_ptr, mz_ptr, mo_ptr, w_ptr, do_ptr, dy_ptr, dz_ptr, dmz_ptr, dmo_ptr, dw_ptr,
    T, H, SZ, SDZ, eps,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
    HAS_MIMO: tl.constexpr, HAS_NORM: tl.constexpr, ROLLED: tl.constexpr,
):  # fmt: skip
    """dz with token stride SDZ (a slice of in_proj's gradient) and partials (one row per
    token block): dmimo_z, dmimo_o (blocks, H, R, P) and dw (blocks, H, P). ROLLED keeps the
    rank loop a loop (unrolled, ranks' tiles overlap and spill past R = 2); otherwise
    `loop_unroll_factor` unrolls it whole (H100: within the ±8% spread of `tl.static_range`,
    results bit-identical)."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    rows = (blk * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = rows < T
    offs = tl.arange(0, P)
    io = (rows * H + h)[:, None] * P + offs[None, :]
    z = _token_z(z_ptr, rows, tmask, h, SZ, offs, P)
    dout = tl.load(do_ptr + io, mask=tmask[:, None], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + h * P + offs).to(tl.float32) if HAS_NORM else tl.zeros([P], tl.float32)
    dz = tl.zeros([BT, P], dtype=tl.float32)
    dw = tl.zeros([P], dtype=tl.float32)
    for r in tl.range(R, loop_unroll_factor=1 if ROLLED else R):
        dz, dw = _rank_backward(r, dz, dw, z, dout, w, y_ptr, mz_ptr, mo_ptr, dy_ptr, dmz_ptr,
                                dmo_ptr, rows, tmask, blk, h, H, offs, eps, R, P, BT, HAS_MIMO,
                                HAS_NORM)  # fmt: skip
    tl.store(dz_ptr + (rows * SDZ + h * P)[:, None] + offs[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=tmask[:, None])  # fmt: skip
    if HAS_NORM:
        tl.store(dw_ptr + (blk * H + h) * P + offs, dw)


def backward_tiling(rank: int) -> tuple[int, int]:
    """(tokens, warps) of a backward program; see the measurements above."""
    if rank == 1:
        return BLOCK_TOKENS, 4
    return UNROLLED_BWD_TILING if rank <= MAX_UNROLLED_RANK else ROLLED_BWD_TILING


class Mamba3Gate(torch.autograd.Function):
    """o (T, H, P) from y (T, R, H, P), z (T, H, P) and the layer's output weights."""

    @staticmethod
    def forward(ctx, y, z, mimo_z, mimo_o, norm_w, eps, grads):
        tokens, rank, heads, p = y.shape
        out = torch.empty(tokens, heads, p, device=y.device, dtype=z.dtype)
        grid = (triton.cdiv(tokens, BLOCK_TOKENS), heads)
        _gate_fwd_kernel[grid](
            y, z, *(pointer_or(w, y) for w in (mimo_z, mimo_o, norm_w)), out, tokens, heads,
            z.stride(0), eps, R=rank, P=p, BT=BLOCK_TOKENS, HAS_MIMO=mimo_z is not None,
            HAS_NORM=norm_w is not None, enable_fp_fusion=True,
        )  # fmt: skip
        ctx.save_for_backward(y, z, mimo_z, mimo_o, norm_w)
        ctx.eps, ctx.grads = eps, grads
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, mimo_z, mimo_o, norm_w = ctx.saved_tensors
        tokens, rank, heads, p = y.shape
        mimo, norm = mimo_z is not None, norm_w is not None
        bt, warps = backward_tiling(rank)
        blocks = triton.cdiv(tokens, bt)
        f32 = {"device": y.device, "dtype": torch.float32}
        dy = torch.empty_like(y)
        dz = gradient_output(ctx.grads, "z", (tokens, heads, p), z)
        per_rank = [torch.empty(blocks, heads, rank, p, **f32) if mimo else dz for _ in range(2)]
        dw = torch.empty(blocks, heads, p, **f32) if norm else dz
        _gate_bwd_kernel[(blocks, heads)](
            y, z, *(pointer_or(w, y) for w in (mimo_z, mimo_o, norm_w)), dout.contiguous(), dy,
            dz, *per_rank, dw, tokens, heads, z.stride(0), dz.stride(0), ctx.eps,
            R=rank, P=p, BT=bt, HAS_MIMO=mimo, HAS_NORM=norm, ROLLED=rank > MAX_UNROLLED_RANK,
            num_warps=warps, enable_fp_fusion=True,
        )  # fmt: skip
        dmz, dmo = (t.sum(0) if mimo else None for t in per_rank)
        return dy, dz, dmz, dmo, dw.sum(0) if norm else None, None, None


def mamba3_gate(
    y: Tensor,
    z: Tensor,
    mimo_z: Tensor | None,
    mimo_o: Tensor | None,
    norm_w: Tensor | None,
    eps: float,
    grads: ProjectionGrads | None = None,
) -> Tensor:
    """Differentiable; y (T, R, H, P) (the scan's output, D skip included), z (T, H, P) (any
    token stride), mimo_z, mimo_o (H, R, P) (both or neither), norm_w (H, P) or None; with
    `grads` (z is its piece "z") dz is written into that buffer. Returns o (T, H, P) in z's
    dtype."""

    def prepared(t: Tensor | None) -> Tensor | None:
        return t.contiguous() if t is not None else None

    return Mamba3Gate.apply(
        y.contiguous(),
        token_major(z),
        prepared(mimo_z),
        prepared(mimo_o),
        prepared(norm_w),
        eps,
        grads,
    )
