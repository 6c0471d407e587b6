"""Triton kernels for the per-head scan inputs of the Mamba-3 prefill: q = rot(RMSNorm(C)·w +
C_bias, φ) and k = rot(RMSNorm(B)·w + B_bias, φ), forward and backward.

B and C come per group (Bt·L, R, G, N); q and k are per head, because the bias and the
angle φ (through Δ) are. The forward writes them once in the activation dtype. The backward
un-rotates dq and dk head by head, sums the heads of each group in registers, and runs the
RMSNorm backward there, so the per-head gradients never go back to memory; it also gives the
angle gradient per (token, rank, head) and per-block partial sums for the norm weights and
the biases (summed by the caller).

Rotation pairs are (2j, 2j+1) ("pairwise") or (j, j+N/2) ("halves") for j < S; every tile is
split into the pairs' first and second elements, so both conventions are one code path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_TOKENS = 16


@triton.jit
def _pair_columns(N: tl.constexpr, PAIRWISE: tl.constexpr):
    j = tl.arange(0, N // 2)
    first = 2 * j if PAIRWISE else j
    second = 2 * j + 1 if PAIRWISE else j + N // 2
    return j, first, second


@triton.jit
def _normalised(src_ptr, w_ptr, rows, g, G, N: tl.constexpr, ia, ib, tmask, eps):
    """RMSNorm rows of one group: (n̂_a, n̂_b) without the weight, the weights, and 1/rms."""
    base = (rows[:, None] * G + g) * N
    va = tl.load(src_ptr + base + ia[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    vb = tl.load(src_ptr + base + ib[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(va * va, 1) + tl.sum(vb * vb, 1)) / N + eps)
    wa = tl.load(w_ptr + ia).to(tl.float32)
    wb = tl.load(w_ptr + ib).to(tl.float32)
    return va * rstd[:, None], vb * rstd[:, None], wa, wb, rstd


@triton.jit
def _angles(phi_ptr, tokens, h, H, S, j, tmask):
    phi = tl.load(
        phi_ptr + (tokens[:, None] * H + h) * S + j[None, :],
        mask=tmask[:, None] & (j < S)[None, :],
        other=0.0,
    )
    return tl.cos(phi), tl.sin(phi)


@triton.jit
def _write_rotated(src_ptr, w_ptr, bias_ptr, dst_ptr, rows, tmask, g, G, h, H, r,
                   R: tl.constexpr, N: tl.constexpr, ia, ib, cos, sin, eps):  # fmt: skip
    na, nb, wa, wb, _ = _normalised(src_ptr, w_ptr, rows, g, G, N, ia, ib, tmask, eps)
    pa = na * wa[None, :] + tl.load(bias_ptr + (h * R + r) * N + ia)[None, :]
    pb = nb * wb[None, :] + tl.load(bias_ptr + (h * R + r) * N + ib)[None, :]
    out = (rows[:, None] * H + h) * N
    ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + out + ia[None, :], (pa * cos - pb * sin).to(ty), mask=tmask[:, None])
    tl.store(dst_ptr + out + ib[None, :], (pa * sin + pb * cos).to(ty), mask=tmask[:, None])


@triton.jit
def _rotated_bc_fwd_kernel(
    b_ptr, c_ptr, bw_ptr, cw_ptr, bb_ptr, cb_ptr, phi_ptr, k_ptr, q_ptr,
    T, H, G, S, eps,
    N: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, PAIRWISE: tl.constexpr,
):  # fmt: skip
    """Program (token block, head): k and q of every rank."""
    h = tl.program_id(1)
    g = h // (H // G)
    tokens = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = tokens < T
    j, ia, ib = _pair_columns(N, PAIRWISE)
    cos, sin = _angles(phi_ptr, tokens, h, H, S, j, tmask)
    for r in tl.static_range(R):
        rows = tokens * R + r
        _write_rotated(b_ptr, bw_ptr, bb_ptr, k_ptr, rows, tmask, g, G, h, H, r, R, N, ia, ib,
                       cos, sin, eps)  # fmt: skip
        _write_rotated(c_ptr, cw_ptr, cb_ptr, q_ptr, rows, tmask, g, G, h, H, r, R, N, ia, ib,
                       cos, sin, eps)  # fmt: skip


@triton.jit
def _unrotate(na, nb, wa, wb, bias_ptr, d_ptr, dbias_ptr, grad, bias_row, partial, ia, ib,
              cos, sin, tmask):  # fmt: skip
    """One head's dq (or dk): its dφ share, the pre-rotation gradient, the bias partial."""
    pa = na * wa[None, :] + tl.load(bias_ptr + bias_row + ia)[None, :]
    pb = nb * wb[None, :] + tl.load(bias_ptr + bias_row + ib)[None, :]
    da = tl.load(d_ptr + grad + ia[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    db = tl.load(d_ptr + grad + ib[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    # the rotated pair is (pa c − pb s, pa s + pb c); dφ = −da·rot_b + db·rot_a
    dphi = db * (pa * cos - pb * sin) - da * (pa * sin + pb * cos)
    dpre_a = da * cos + db * sin
    dpre_b = db * cos - da * sin
    tl.store(dbias_ptr + partial + ia, tl.sum(dpre_a, 0))
    tl.store(dbias_ptr + partial + ib, tl.sum(dpre_b, 0))
    return dphi, dpre_a, dpre_b


@triton.jit
def _norm_backward(na, nb, wa, wb, rstd, dua, dub, dsrc_ptr, dw_ptr, wpart, rows, tmask, g, G,
                   N: tl.constexpr, ia, ib):  # fmt: skip
    """RMSNorm backward, d raw = rstd·(w·du − n̂·mean(n̂·w·du)), and the weight partial."""
    tl.store(dw_ptr + wpart + ia, tl.sum(dua * na, 0))
    tl.store(dw_ptr + wpart + ib, tl.sum(dub * nb, 0))
    ga = dua * wa[None, :]
    gb = dub * wb[None, :]
    mean = (tl.sum(ga * na, 1) + tl.sum(gb * nb, 1)) / N
    base = (rows[:, None] * G + g) * N
    tl.store(dsrc_ptr + base + ia[None, :], rstd[:, None] * (ga - na * mean[:, None]),
             mask=tmask[:, None])  # fmt: skip
    tl.store(dsrc_ptr + base + ib[None, :], rstd[:, None] * (gb - nb * mean[:, None]),
             mask=tmask[:, None])  # fmt: skip


@triton.jit
def _rotated_bc_bwd_kernel(
    b_ptr, c_ptr, bw_ptr, cw_ptr, bb_ptr, cb_ptr, phi_ptr, dk_ptr, dq_ptr,
    db_ptr, dc_ptr, dbw_ptr, dcw_ptr, dbb_ptr, dcb_ptr, dphi_ptr,
    T, H, G, S, eps,
    N: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, PAIRWISE: tl.constexpr,
):  # fmt: skip
    """Program (token block, group, rank): loops over the group's heads.

    Writes d(raw B|C) for its rows, partial sums over its tokens of the norm-weight and bias
    gradients (one row per block), and dφ per (token, rank, head) from q and k together.
    """
    blk = tl.program_id(0)
    g = tl.program_id(1)
    r = tl.program_id(2)
    heads_per_group = H // G
    tokens = (blk * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = tokens < T
    rows = tokens * R + r
    j, ia, ib = _pair_columns(N, PAIRWISE)
    kna, knb, kwa, kwb, krstd = _normalised(b_ptr, bw_ptr, rows, g, G, N, ia, ib, tmask, eps)
    qna, qnb, qwa, qwb, qrstd = _normalised(c_ptr, cw_ptr, rows, g, G, N, ia, ib, tmask, eps)
    dku_a = tl.zeros([BT, N // 2], dtype=tl.float32)
    dku_b = tl.zeros([BT, N // 2], dtype=tl.float32)
    dqu_a = tl.zeros([BT, N // 2], dtype=tl.float32)
    dqu_b = tl.zeros([BT, N // 2], dtype=tl.float32)
    for h in range(g * heads_per_group, (g + 1) * heads_per_group):
        cos, sin = _angles(phi_ptr, tokens, h, H, S, j, tmask)
        grad = (rows[:, None] * H + h) * N
        bias_row = (h * R + r) * N
        partial = ((blk * H + h) * R + r) * N
        dphi_k, dka, dkb = _unrotate(kna, knb, kwa, kwb, bb_ptr, dk_ptr, dbb_ptr, grad,
                                     bias_row, partial, ia, ib, cos, sin, tmask)  # fmt: skip
        dphi_q, dqa, dqb = _unrotate(qna, qnb, qwa, qwb, cb_ptr, dq_ptr, dcb_ptr, grad,
                                     bias_row, partial, ia, ib, cos, sin, tmask)  # fmt: skip
        dku_a += dka
        dku_b += dkb
        dqu_a += dqa
        dqu_b += dqb
        tl.store(
            dphi_ptr + (rows[:, None] * H + h) * S + j[None, :],
            dphi_k + dphi_q,
            mask=tmask[:, None] & (j < S)[None, :],
        )
    wpart = ((blk * G + g) * R + r) * N
    _norm_backward(kna, knb, kwa, kwb, krstd, dku_a, dku_b, db_ptr, dbw_ptr, wpart, rows, tmask,
                   g, G, N, ia, ib)  # fmt: skip
    _norm_backward(qna, qnb, qwa, qwb, qrstd, dqu_a, dqu_b, dc_ptr, dcw_ptr, wpart, rows, tmask,
                   g, G, N, ia, ib)  # fmt: skip


class RotatedBC(torch.autograd.Function):
    """(k, q) per head from per-group B and C; see the module docstring."""

    @staticmethod
    def forward(ctx, b, c, b_w, c_w, b_bias, c_bias, phi, eps, pairwise, out_dtype):
        tokens, rank, groups, n = b.shape
        heads, n_angles = phi.shape[1], phi.shape[2]
        k = torch.empty(tokens, rank, heads, n, device=b.device, dtype=out_dtype)
        q = torch.empty_like(k)
        grid = (triton.cdiv(tokens, BLOCK_TOKENS), heads)
        _rotated_bc_fwd_kernel[grid](
            b, c, b_w, c_w, b_bias, c_bias, phi, k, q, tokens, heads, groups, n_angles, eps,
            N=n, R=rank, BT=BLOCK_TOKENS, PAIRWISE=pairwise,
        )  # fmt: skip
        ctx.save_for_backward(b, c, b_w, c_w, b_bias, c_bias, phi)
        ctx.eps, ctx.pairwise = eps, pairwise
        return k, q

    @staticmethod
    def backward(ctx, dk, dq):
        b, c, b_w, c_w, b_bias, c_bias, phi = ctx.saved_tensors
        tokens, rank, groups, n = b.shape
        heads, n_angles = phi.shape[1], phi.shape[2]
        shape = (tokens, rank, heads, n)
        dk = dk.contiguous() if dk is not None else torch.zeros(shape, device=b.device)
        dq = dq.contiguous() if dq is not None else torch.zeros(shape, device=b.device)
        blocks = triton.cdiv(tokens, BLOCK_TOKENS)
        f32 = {"device": b.device, "dtype": torch.float32}
        db, dc = torch.empty(b.shape, **f32), torch.empty(c.shape, **f32)
        dbw, dcw = (torch.empty(blocks, groups, rank, n, **f32) for _ in range(2))
        dbb, dcb = (torch.empty(blocks, heads, rank, n, **f32) for _ in range(2))
        dphi = torch.empty(tokens, rank, heads, n_angles, **f32)
        _rotated_bc_bwd_kernel[(blocks, groups, rank)](
            b, c, b_w, c_w, b_bias, c_bias, phi, dk, dq, db, dc, dbw, dcw, dbb, dcb, dphi,
            tokens, heads, groups, n_angles, ctx.eps,
            N=n, R=rank, BT=BLOCK_TOKENS, PAIRWISE=ctx.pairwise,
        )  # fmt: skip
        return (
            db.to(b.dtype), dc.to(c.dtype),
            dbw.sum((0, 1, 2)).to(b_w.dtype), dcw.sum((0, 1, 2)).to(c_w.dtype),
            dbb.sum(0).to(b_bias.dtype), dcb.sum(0).to(c_bias.dtype),
            dphi.sum(1).to(phi.dtype), None, None, None,
        )  # fmt: skip


def rotated_bc(
    b: Tensor,
    c: Tensor,
    b_norm: Tensor,
    c_norm: Tensor,
    b_bias: Tensor,
    c_bias: Tensor,
    phi: Tensor,
    eps: float,
    rotation: str,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """k, q (T, R, H, N) in out_dtype from b, c (T, R, G, N), norm weights (N,), biases
    (H, R, N) and angles φ (T, H, S) (fp32); differentiable in every tensor."""
    return RotatedBC.apply(
        b.contiguous(), c.contiguous(), b_norm.contiguous(), c_norm.contiguous(),
        b_bias.float().contiguous(), c_bias.float().contiguous(), phi.float().contiguous(),
        eps, rotation == "pairwise", out_dtype,
    )  # fmt: skip
