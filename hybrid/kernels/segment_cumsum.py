"""Cumulative sums along the token axis that restart at every sequence boundary, in Triton.

The Mamba-3 prefill needs them for the rotation angles φ_t = φ_start + Σ_{s≤t} Δ_s θ_s
(wrapped to [0, 2π) as they go, so float32 stays exact over any length; the increments
Δ_{t,h}·θ_{t,s} are formed on the fly from their two factors, never stored) and, in the
backward, for the reverse sums of the angle and log-decay gradients. torch.cumsum over the
outer axis of a (T, C) tensor runs one thread per column and is serial in T; here each
program owns a strip of columns of one sequence and walks its tokens a block at a time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.triton_math import wrap_angle

BLOCK_TOKENS = 128
# programs the column strips should make: each walks its sequence's tokens serially, so a few
# long sequences need narrow strips to fill the GPU (H100, 1024 columns: 32-column strips
# took 776 + 401 us for the angle sum and a reverse sum at 1 × 16384 and 418 + 240 us at
# 2 × 8192; 4-column strips 251 + 230 and 217 + 162; at 8 × 2048, 16 columns: 154 + 103 ->
# 146 + 89)
TARGET_PROGRAMS = 512


@triton.jit
def _segment_cumsum_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    init_ptr,
    starts_ptr,
    C,
    YC,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    WRAP: tl.constexpr,
    OUTER: tl.constexpr,
):
    """OUTER: column c of token t is x[t, c // YC] · y[t, c % YC] (x: (T, C / YC), y: (T, YC))."""
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
        if OUTER:
            t = rows.to(tl.int64)[:, None]
            x = tl.load(x_ptr + t * (C // YC) + cols[None, :] // YC, mask=mask, other=0.0)
            x *= tl.load(y_ptr + t * YC + cols[None, :] % YC, mask=mask, other=0.0)
        else:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if REVERSE:
            sums = carry[None, :] + tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x
            carry = carry + tl.sum(x, 0)
        else:
            sums = carry[None, :] + tl.cumsum(x, 0)
            carry = carry + tl.sum(x, 0)
        if WRAP:
            sums = wrap_angle(sums)
            carry = wrap_angle(carry)
        tl.store(out_ptr + offs, sums, mask=mask)


def strip_columns(total_columns: int) -> int:
    """Columns a program owns: a power of two in [4, 32] (16-128-byte rows) that gives about
    TARGET_PROGRAMS programs over all sequences' columns."""
    wanted = max(1, total_columns // TARGET_PROGRAMS)
    return 1 << max(2, min(5, wanted.bit_length() - 1))


def segment_cumsum(
    x: Tensor | tuple[Tensor, Tensor],
    starts: Tensor,
    init: Tensor | None = None,
    reverse: bool = False,
    wrap: bool = False,
) -> Tensor:
    """Per sequence [starts[i], starts[i+1]) of dim 0: init[i] + Σ_{s≤t} x_s (reverse: Σ_{s≥t}),
    optionally wrapped to [0, 2π). x: (T, ...) -> float32 of the same shape; or a pair of
    float32 factors (T, A), (T, B) standing for their outer product (T, A, B). No autograd."""
    if isinstance(x, tuple):
        left, right = (t.float().contiguous() for t in x)
        shape, inner = (*left.shape, right.shape[1]), right.shape[1]
    else:
        left = right = x.reshape(x.shape[0], -1).float().contiguous()
        shape, inner = x.shape, 1
    columns = math.prod(shape[1:])
    out = torch.empty(shape[0], columns, device=left.device, dtype=torch.float32)
    n_seq = starts.numel() - 1
    bc = min(triton.next_power_of_2(columns), strip_columns(n_seq * columns))
    grid = (n_seq, triton.cdiv(columns, bc))
    init_flat = init.reshape(init.shape[0], -1).float().contiguous() if init is not None else out
    _segment_cumsum_kernel[grid](
        left, right, out, init_flat, starts, columns, inner,
        BT=BLOCK_TOKENS, BC=bc, HAS_INIT=init is not None, REVERSE=reverse, WRAP=wrap,
        OUTER=isinstance(x, tuple), enable_fp_fusion=True,
    )  # fmt: skip
    return out.view(shape)
