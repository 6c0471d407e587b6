"""Triton kernels for the per-head scan inputs of the Mamba-3 prefill: q = rot(RMSNorm(C)·w +
C_bias, φ) and k = rot(RMSNorm(B)·w + B_bias, φ), forward and backward.

B and C come per group (T, R, G, N); q and k are per head, because the bias and the angle φ
(through Δ) are. A program owns a block of tokens, one rank and a few heads of one group: it
normalises its B and C rows once and then writes (forward) or reads (backward) whole rows of
every head it owns, so each head's rows move as contiguous vectors. A backward program owns
every rank of its tokens and heads: per rank it un-rotates dq and dk head by head, sums its
heads in registers and runs the RMSNorm backward there (linear in the summed gradient, so
programs that split a group's heads add their parts afterwards); it adds each rank's angle
gradient into its own (token, head) rows, so the ranks are summed without an R-times-larger
float32 buffer and a reduction (storing that buffer took 0.47 ms of the R=4 backward at
8 × 2048 on an H100), and it writes per-block partial sums for the norm weights and the
biases (summed by the caller).

Rotation pairs are (2j, 2j+1) ("pairwise") or (j, j+N/2) ("halves") for j < S; rows are
split into the pairs' first and second elements in registers, so both conventions are one
code path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.launch_args import token_major
from hybrid.kernels.projection_grads import ProjectionGrads
from hybrid.kernels.triton_math import cos_sin_wrapped

# programs (tokens, warps, pipeline stages of the head loop). Both head loops are pipelined
# (Triton's asynchronous copies bring the next heads' rows while this head is computed).
# H100, H=32, N=128, 16,384 tokens, kernels alone, µs: the backward at R = 1 / 2 / 4 / 8
# took 369 / 731 / 1534 / 3150 (16 tokens, 2 warps, no pipeline) and takes 231 / 562 / 1098
# / 2160 (a sweep of 4-32 tokens × 1-4 warps × 1-4 stages; MIMO at 8 tokens). The MIMO
# backward's best block holds 1,024 (token, state) elements: 16 tokens at N=64 (49,152
# tokens, H=16, R=4: 834 µs against 1,144 at 8 tokens); SISO stays at 16 either way. The
# forward, 16 tokens on 8 warps for every rank: R=4 548 → 522 µs at N=128, SISO 116 → 106
# at N=64 (against 32 tokens on 2 warps, unpipelined), SISO at N=128 unchanged.
FORWARD_TILING = (16, 8, 3)
SISO_BACKWARD_TILING = (16, 2, 3)
MIMO_BACKWARD_ELEMENTS, MIMO_BACKWARD_WARPS, MIMO_BACKWARD_STAGES = 1024, 2, 3
# H100, 8 × 2048, H=32: the backward took 0.37 ms (SISO) and 1.72 ms (R=4) with 32 heads per
# program against 0.42 and 1.99 ms with 8; fewer than ~512 programs leave SMs idle
MAX_HEADS_PER_PROGRAM = 32
MIN_PROGRAMS = 512


@triton.jit
def _split_pairs(v, BT: tl.constexpr, N: tl.constexpr, PAIRWISE: tl.constexpr):
    """(BT, N) rows -> the pairs' first and second elements, (BT, N/2) each."""
    if PAIRWISE:
        first, second = tl.split(tl.reshape(v, [BT, N // 2, 2]))
    else:
        first, second = tl.split(tl.permute(tl.reshape(v, [BT, 2, N // 2]), [0, 2, 1]))
    return first, second


@triton.jit
def _join_pairs(first, second, BT: tl.constexpr, N: tl.constexpr, PAIRWISE: tl.constexpr):
    """Inverse of `_split_pairs`."""
    if PAIRWISE:
        rows = tl.reshape(tl.join(first, second), [BT, N])
    else:
        rows = tl.reshape(tl.permute(tl.join(first, second), [0, 2, 1]), [BT, N])
    return rows


@triton.jit
def _normalised(src_ptr, w_ptr, tokens, stride, r, g, G, cols, tmask, eps, N: tl.constexpr):
    """RMSNorm of one group's rows of rank r: n̂ (without the weight), the weight row and
    1/rms. `stride` is the source's token stride (B and C are slices of in_proj)."""
    v = tl.load(src_ptr + (tokens * stride + (r * G + g) * N)[:, None] + cols[None, :],
                mask=tmask[:, None], other=0.0).to(tl.float32)  # fmt: skip
    rstd = tl.rsqrt(tl.sum(v * v, 1) / N + eps)
    w = tl.load(w_ptr + cols).to(tl.float32)
    return v * rstd[:, None], w[None, :], rstd


@triton.jit
def _angles(phi_ptr, tokens, h, H, S, tmask, N: tl.constexpr):
    """cos φ, sin φ of one head (BT, N/2) from φ in [0, 2π); pairs j >= S are not rotated."""
    j = tl.arange(0, N // 2)
    rotated = (j < S)[None, :]
    phi = tl.load(phi_ptr + (tokens[:, None] * H + h) * S + j[None, :],
                  mask=tmask[:, None] & rotated, other=0.0)  # fmt: skip
    cos, sin = cos_sin_wrapped(phi)
    return tl.where(rotated, cos, 1.0), tl.where(rotated, sin, 0.0)


@triton.jit
def _write_rotated(n, w, bias_ptr, dst_ptr, bias_row, out, cos, sin, tmask,
                   BT: tl.constexpr, N: tl.constexpr, PAIRWISE: tl.constexpr):  # fmt: skip
    """One head's rows: rotate (n̂·w + bias) by φ and store them in the output dtype."""
    bias = tl.load(bias_ptr + bias_row).to(tl.float32)  # as stored
    a, b = _split_pairs(n * w + bias[None, :], BT, N, PAIRWISE)
    rotated = _join_pairs(a * cos - b * sin, a * sin + b * cos, BT, N, PAIRWISE)
    tl.store(dst_ptr + out, rotated.to(dst_ptr.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _rotated_bc_fwd_kernel(
    b_ptr, c_ptr, bw_ptr, cw_ptr, bb_ptr, cb_ptr, phi_ptr, k_ptr, q_ptr,
    T, H, G, S, SB, SC, eps,
    N: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, HB: tl.constexpr,
    PAIRWISE: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program (token block, HB heads of one group, rank): k and q rows of those heads."""
    h0 = tl.program_id(1) * HB
    r = tl.program_id(2)
    g = h0 // (H // G)
    tokens = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = tokens < T
    rows = tokens * R + r
    cols = tl.arange(0, N)
    kn, kw, _ = _normalised(b_ptr, bw_ptr, tokens, SB, r, g, G, cols, tmask, eps, N)
    qn, qw, _ = _normalised(c_ptr, cw_ptr, tokens, SC, r, g, G, cols, tmask, eps, N)
    for i in tl.range(HB, num_stages=STAGES):
        h = h0 + i
        cos, sin = _angles(phi_ptr, tokens, h, H, S, tmask, N)
        bias_row = (h * R + r) * N + cols
        out = (rows[:, None] * H + h) * N + cols[None, :]
        _write_rotated(kn, kw, bb_ptr, k_ptr, bias_row, out, cos, sin, tmask, BT, N, PAIRWISE)
        _write_rotated(qn, qw, cb_ptr, q_ptr, bias_row, out, cos, sin, tmask, BT, N, PAIRWISE)


@triton.jit
def _unrotate(n, w, bias_ptr, d_ptr, dbias_ptr, grad, bias_row, partial, cos, sin, tmask,
              BT: tl.constexpr, N: tl.constexpr, PAIRWISE: tl.constexpr):  # fmt: skip
    """One head's dq (or dk): its dφ share, the pre-rotation gradient (split into pair
    halves) and the bias partial over this block's tokens."""
    bias = tl.load(bias_ptr + bias_row).to(tl.float32)
    pa, pb = _split_pairs(n * w + bias[None, :], BT, N, PAIRWISE)
    d = tl.load(d_ptr + grad, mask=tmask[:, None], other=0.0).to(tl.float32)
    da, db = _split_pairs(d, BT, N, PAIRWISE)
    # the rotated pair is (pa c − pb s, pa s + pb c); dφ = −da·rot_b + db·rot_a
    dphi = db * (pa * cos - pb * sin) - da * (pa * sin + pb * cos)
    dpre_a = da * cos + db * sin
    dpre_b = db * cos - da * sin
    sums = _join_pairs(tl.sum(dpre_a, 0)[None, :], tl.sum(dpre_b, 0)[None, :], 1, N, PAIRWISE)
    tl.store(dbias_ptr + partial + tl.arange(0, N)[None, :], sums)
    return dphi, dpre_a, dpre_b


@triton.jit
def _norm_backward(n, w, rstd, dua, dub, dsrc_ptr, dw_ptr, wpart, dst, tmask,
                   BT: tl.constexpr, N: tl.constexpr, PAIRWISE: tl.constexpr):  # fmt: skip
    """RMSNorm backward, d raw = rstd·(w·du − n̂·mean(n̂·w·du)), and the weight partial."""
    du = _join_pairs(dua, dub, BT, N, PAIRWISE)
    tl.store(dw_ptr + wpart + tl.arange(0, N), tl.sum(du * n, 0))
    gw = du * w
    mean = tl.sum(gw * n, 1) / N
    d_raw = rstd[:, None] * (gw - n * mean[:, None])
    tl.store(dsrc_ptr + dst, d_raw.to(dsrc_ptr.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _rotated_bc_bwd_kernel(
    b_ptr, c_ptr, bw_ptr, cw_ptr, bb_ptr, cb_ptr, phi_ptr, dk_ptr, dq_ptr,
    db_ptr, dc_ptr, dbw_ptr, dcw_ptr, dbb_ptr, dcb_ptr, dphi_ptr,
    T, H, G, S, SB, SC, SD, eps,
    N: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, HB: tl.constexpr,
    PAIRWISE: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program (token block, HB heads of one group), every rank.

    Writes its heads' part of d(raw B|C) (one slice per head block of the group; token
    stride SD, so with one slice it may be in_proj's gradient), partial sums over its tokens
    of the norm-weight and bias gradients, and dφ per (token, head), summed over q, k and
    the ranks.
    """
    blk = tl.program_id(0)
    hblk = tl.program_id(1)
    h0 = hblk * HB
    n_hblk = H // HB
    g = h0 // (H // G)
    tokens = (blk * BT + tl.arange(0, BT)).to(tl.int64)
    tmask = tokens < T
    cols = tl.arange(0, N)
    j = tl.arange(0, N // 2)
    dphi_mask = tmask[:, None] & (j < S)[None, :]
    for r in range(R):
        rows = tokens * R + r
        kn, kw, krstd = _normalised(b_ptr, bw_ptr, tokens, SB, r, g, G, cols, tmask, eps, N)
        qn, qw, qrstd = _normalised(c_ptr, cw_ptr, tokens, SC, r, g, G, cols, tmask, eps, N)
        dku_a = tl.zeros([BT, N // 2], dtype=tl.float32)
        dku_b = tl.zeros([BT, N // 2], dtype=tl.float32)
        dqu_a = tl.zeros([BT, N // 2], dtype=tl.float32)
        dqu_b = tl.zeros([BT, N // 2], dtype=tl.float32)
        for i in tl.range(HB, num_stages=STAGES):
            h = h0 + i
            cos, sin = _angles(phi_ptr, tokens, h, H, S, tmask, N)
            grad = (rows[:, None] * H + h) * N + cols[None, :]
            bias_row = (h * R + r) * N + cols
            partial = ((blk * H + h) * R + r) * N
            dphi_k, dka, dkb = _unrotate(kn, kw, bb_ptr, dk_ptr, dbb_ptr, grad, bias_row,
                                         partial, cos, sin, tmask, BT, N, PAIRWISE)  # fmt: skip
            dphi_q, dqa, dqb = _unrotate(qn, qw, cb_ptr, dq_ptr, dcb_ptr, grad, bias_row,
                                         partial, cos, sin, tmask, BT, N, PAIRWISE)  # fmt: skip
            dku_a += dka
            dku_b += dkb
            dqu_a += dqa
            dqu_b += dqb
            # rank r > 0 adds to what this program stored for the earlier ranks
            dphi_offs = (tokens[:, None] * H + h) * S + j[None, :]
            earlier = tl.load(dphi_ptr + dphi_offs, mask=dphi_mask & (r > 0), other=0.0)
            tl.store(dphi_ptr + dphi_offs, earlier + dphi_k + dphi_q, mask=dphi_mask)
        # d raw is (head blocks per group, T, R·G·N): slice hblk % (head blocks per group)
        split = hblk % (n_hblk // G)
        dst = ((split * T + tokens) * SD + (r * G + g) * N)[:, None] + cols[None, :]
        wpart = ((blk * n_hblk + hblk) * R + r) * N
        _norm_backward(kn, kw, krstd, dku_a, dku_b, db_ptr, dbw_ptr, wpart, dst, tmask,
                       BT, N, PAIRWISE)  # fmt: skip
        _norm_backward(qn, qw, qrstd, dqu_a, dqu_b, dc_ptr, dcw_ptr, wpart, dst, tmask,
                       BT, N, PAIRWISE)  # fmt: skip
        tl.debug_barrier()  # the next rank reads dφ rows other threads of the program stored


def heads_per_program(heads_per_group: int, token_blocks: int) -> int:
    """The largest divisor of the group's head count, at most MAX_HEADS_PER_PROGRAM, that
    still leaves MIN_PROGRAMS programs: a program normalises its B/C rows once for all its
    heads, and with the whole group in one program the backward writes d(raw B|C) once,
    without per-split float32 parts and their reduction (any divisor: 12 or 24 heads, as at
    d_model 384 or 768, would otherwise split in three)."""
    fitting = [hb for hb in range(1, min(heads_per_group, MAX_HEADS_PER_PROGRAM) + 1)
               if heads_per_group % hb == 0]  # fmt: skip
    enough = [hb for hb in fitting if token_blocks * (heads_per_group // hb) >= MIN_PROGRAMS]
    return max(enough or [1])


def backward_tiling(rank: int, d_state: int) -> tuple[int, int, int]:
    """(tokens, warps, pipeline stages) of a backward program; see the measurements above."""
    if rank == 1:
        return SISO_BACKWARD_TILING
    tokens = min(32, max(1, MIMO_BACKWARD_ELEMENTS // d_state))
    return tokens, MIMO_BACKWARD_WARPS, MIMO_BACKWARD_STAGES


class RotatedBC(torch.autograd.Function):
    """(k, q) per head from per-group B and C; see the module docstring."""

    @staticmethod
    def forward(ctx, b, c, b_w, c_w, b_bias, c_bias, phi, eps, pairwise, out_dtype, grads):
        tokens, rank, groups, n = b.shape
        heads, n_angles = phi.shape[1], phi.shape[2]
        bt, warps, stages = FORWARD_TILING
        hb = heads_per_program(heads // groups, triton.cdiv(tokens, bt) * rank)
        k = torch.empty(tokens, rank, heads, n, device=b.device, dtype=out_dtype)
        q = torch.empty_like(k)
        grid = (triton.cdiv(tokens, bt), heads // hb, rank)
        _rotated_bc_fwd_kernel[grid](
            b, c, b_w, c_w, b_bias, c_bias, phi, k, q, tokens, heads, groups, n_angles,
            b.stride(0), c.stride(0), eps,
            N=n, R=rank, BT=bt, HB=hb, PAIRWISE=pairwise, STAGES=stages, num_warps=warps,
            enable_fp_fusion=True,
        )  # fmt: skip
        ctx.save_for_backward(b, c, b_w, c_w, b_bias, c_bias, phi)
        ctx.eps, ctx.pairwise, ctx.grads = eps, pairwise, grads
        return k, q

    @staticmethod
    def backward(ctx, dk, dq):
        b, c, b_w, c_w, b_bias, c_bias, phi = ctx.saved_tensors
        tokens, rank, groups, n = b.shape
        heads, n_angles = phi.shape[1], phi.shape[2]
        bt, warps, stages = backward_tiling(rank, n)
        blocks = triton.cdiv(tokens, bt)
        hb = heads_per_program(heads // groups, blocks)
        splits = heads // groups // hb
        shape = (tokens, rank, heads, n)
        dk = dk.contiguous() if dk is not None else torch.zeros(shape, device=b.device)
        dq = dq.contiguous() if dq is not None else torch.zeros(shape, device=b.device)
        f32 = {"device": b.device, "dtype": torch.float32}
        # B's and C's parts share one buffer, so one reduction (and cast) serves both; with
        # one split the kernel stores them in their own dtype, into in_proj's gradient
        # where they are its pieces (of one tensor, so of one dtype)
        raw_dtype = b.dtype if b.dtype == c.dtype else torch.float32
        direct = ctx.grads is not None and splits == 1
        if direct:
            db, dc = (ctx.grads.output(name, b.shape) for name in ("b", "c"))
        else:
            draw = torch.empty(2, splits, tokens, rank, groups, n, device=b.device,
                               dtype=raw_dtype if splits == 1 else torch.float32)  # fmt: skip
            db, dc = draw[0], draw[1]
        dw = torch.empty(2, blocks, heads // hb, rank, n, **f32)
        dbias = torch.empty(2, blocks, heads, rank, n, **f32)
        dphi = torch.empty(tokens, heads, n_angles, **f32)
        _rotated_bc_bwd_kernel[(blocks, heads // hb)](
            b, c, b_w, c_w, b_bias, c_bias, phi, dk, dq, db, dc, dw[0], dw[1],
            dbias[0], dbias[1], dphi, tokens, heads, groups, n_angles, b.stride(0),
            c.stride(0), db.stride(-4), ctx.eps, N=n, R=rank, BT=bt, HB=hb, PAIRWISE=ctx.pairwise,
            STAGES=stages, num_warps=warps, enable_fp_fusion=True,
        )  # fmt: skip
        if not direct:
            draw = draw[:, 0] if splits == 1 else draw.sum(1).to(raw_dtype)
            db, dc = draw[0].to(b.dtype), draw[1].to(c.dtype)
        dw = dw.sum((1, 2, 3))
        dbias = dbias.sum(1)
        return (
            db, dc, dw[0].to(b_w.dtype), dw[1].to(c_w.dtype),
            dbias[0].to(b_bias.dtype), dbias[1].to(c_bias.dtype),
            dphi.to(phi.dtype), None, None, None, None,
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
    grads: ProjectionGrads | None = None,
) -> tuple[Tensor, Tensor]:
    """k, q (T, R, H, N) in out_dtype from b, c (T, R, G, N) (any token stride), norm
    weights (N,), biases (H, R, N) and angles φ (T, H, S) (fp32, in [0, 2π) as
    `mamba3_coefficients` gives them); differentiable in every tensor. With `grads` (b and c
    are its pieces "b" and "c") their gradients are written into that buffer."""
    return RotatedBC.apply(
        token_major(b), token_major(c), b_norm.contiguous(), c_norm.contiguous(),
        b_bias.contiguous(), c_bias.contiguous(), phi.float().contiguous(),
        eps, rotation == "pairwise", out_dtype, grads,
    )  # fmt: skip
