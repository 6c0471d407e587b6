"""Cumulative sums along the token axis that restart at every sequence boundary, in Triton.

The Mamba-3 prefill needs two: the rotation angles φ_t = φ_start + Σ_{s≤t} Δ_s θ_s (wrapped
to [0, 2π) as they go, so float32 stays exact over any length) and, in the backward, the
reverse sum of the log-decay gradient. torch.cumsum over the outer axis of a (T, C) tensor
runs one thread per column and is serial in T; here each program owns a strip of columns of
one sequence and walks its tokens a block at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _segment_cumsum_kernel(
    x_ptr,
    out_ptr,
    init_ptr,
    starts_ptr,
    C,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    WRAP: tl.constexpr,
):
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < C
    start = tl.load(starts_ptr + seq)
    end = tl.load(starts_ptr + seq + 1)
    if HAS_INIT:
        carry = tl.load(init_ptr + seq.to(tl.int64) * C + cols, mask=col_ok, other=0.0)
    else:
        carry = tl.zeros([BC], dtype=tl.float32)
    n_blocks = tl.cdiv(end - start, BT)
    for step in range(0, n_blocks):
        block = n_blocks - 1 - step if REVERSE else step
        rows = start + block * BT + tl.arange(0, BT)
        mask = (rows < end)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if REVERSE:
            sums = carry[None, :] + tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x
            carry = carry + tl.sum(x, 0)
        else:
            sums = carry[None, :] + tl.cumsum(x, 0)
            carry = carry + tl.sum(x, 0)
        if WRAP:
            sums = sums - TWO_PI * tl.floor(sums / TWO_PI)
            carry = carry - TWO_PI * tl.floor(carry / TWO_PI)
        tl.store(out_ptr + offs, sums, mask=mask)


def segment_cumsum(
    x: Tensor,
    starts: Tensor,
    init: Tensor | None = None,
    reverse: bool = False,
    wrap: bool = False,
) -> Tensor:
    """Per sequence [starts[i], starts[i+1]) of dim 0: init[i] + Σ_{s≤t} x_s (reverse: Σ_{s≥t}),
    optionally wrapped to [0, 2π). x: (T, ...) -> float32 of the same shape. No autograd."""
    flat = x.reshape(x.shape[0], -1).float().contiguous()
    columns = flat.shape[1]
    out = torch.empty_like(flat)
    bc = min(triton.next_power_of_2(columns), 32)
    grid = (starts.numel() - 1, triton.cdiv(columns, bc))
    init_flat = init.reshape(init.shape[0], -1).float().contiguous() if init is not None else flat
    _segment_cumsum_kernel[grid](
        flat, out, init_flat, starts, columns,
        BT=64, BC=bc, HAS_INIT=init is not None, REVERSE=reverse, WRAP=wrap,
    )  # fmt: skip
    return out.view(x.shape)


class WrappedAngleSum(torch.autograd.Function):
    """φ = wrap(φ_start + segment cumsum of increments); wrapping has gradient 1."""

    @staticmethod
    def forward(ctx, increments: Tensor, start: Tensor | None, starts: Tensor) -> Tensor:
        ctx.save_for_backward(starts)
        ctx.has_start = start is not None
        return segment_cumsum(increments, starts, start, wrap=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (starts,) = ctx.saved_tensors
        d_increments = segment_cumsum(grad.contiguous(), starts, reverse=True)
        d_start = d_increments[starts[:-1].long()] if ctx.has_start else None
        return d_increments, d_start, None


def wrapped_angle_sum(increments: Tensor, start: Tensor | None, starts: Tensor) -> Tensor:
    """Differentiable wrapped angle sums: increments (T, ...), start (n_seq, ...) or None,
    starts (n_seq + 1,) int32 token offsets."""
    return WrappedAngleSum.apply(increments, start, starts)
