"""Cumulative sums along the token axis that restart at every sequence boundary, in Triton.

The Mamba-3 prefill's backward needs them for the reverse sums of the angle gradients, and
the chunk-parallel sums (`chunked_cumsum`) for the short scan over their chunks' sums.
torch.cumsum over the outer axis of a (T, C) tensor runs one thread per column and is serial
in T; here each program owns a strip of columns of one sequence and walks its tokens a block
at a time, loading each block one step ahead so the load overlaps the previous block's sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.triton_math import wrap_angle

# Each program walks its sequence's tokens serially over a strip of columns, so the tiling
# trades strip width (programs) against the serial chain. H100, reverse sums of a (T, 32, 32)
# input, every option of tokens 16-128 × columns 4-32 × warps 1-4 with and without the early
# load (always faster or equal, so always on), us: 8 × 2048 60 -> 55 (128 tokens, 32 columns,
# 4 warps: 256 programs), 2 × 8192 112 -> 77 (128, 8, 4: 256), 1 × 16384 181 -> 115 (128, 8,
# 4: 128; 4 columns, 256 programs: 120). Before: strips for ~512 programs, no early load.
BLOCK_TOKENS = 128
WARPS = 4
TARGET_PROGRAMS = 256
MIN_COLUMNS, MAX_COLUMNS = 4, 32


@triton.jit
def _block(x_ptr, rows, start, end, cols, col_ok, C):
    """Rows `rows` of the input in float32, zero outside [start, end)."""
    mask = ((rows >= start) & (rows < end))[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    return tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


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
    step_rows = -BT if REVERSE else BT
    rows = start + (n_blocks - 1 if REVERSE else 0) * BT + tl.arange(0, BT)
    upcoming = _block(x_ptr, rows, start, end, cols, col_ok, C)
    for _ in range(0, n_blocks):
        x = upcoming
        upcoming = _block(x_ptr, rows + step_rows, start, end, cols, col_ok, C)
        total = tl.sum(x, 0)
        if REVERSE:
            sums = (carry + total)[None, :] - tl.cumsum(x, 0) + x
        else:
            sums = carry[None, :] + tl.cumsum(x, 0)
        carry = carry + total
        if WRAP:
            sums = wrap_angle(sums)
            carry = wrap_angle(carry)
        mask = (rows < end)[:, None] & col_ok[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], sums, mask=mask)
        rows += step_rows


def strip_columns(n_seq: int, columns: int) -> int:
    """Columns a program owns: a power of two in [MIN_COLUMNS, MAX_COLUMNS] giving about
    TARGET_PROGRAMS programs over all sequences."""
    wanted = 1 << (max(1, n_seq * columns // TARGET_PROGRAMS).bit_length() - 1)
    return min(max(MIN_COLUMNS, min(MAX_COLUMNS, wanted)), triton.next_power_of_2(columns))


def segment_cumsum(
    x: Tensor,
    starts: Tensor,
    init: Tensor | None = None,
    reverse: bool = False,
    wrap: bool = False,
    block_tokens: int = BLOCK_TOKENS,
) -> Tensor:
    """Per sequence [starts[i], starts[i+1]) of dim 0: init[i] + Σ_{s≤t} x_s (reverse: Σ_{s≥t}),
    optionally wrapped to [0, 2π). x: (T, ...) -> float32 of the same shape. block_tokens
    (a power of two) is how many rows are summed at a time: a block's float32 partial sums
    are only as exact as their magnitude allows. No autograd."""
    flat = x.reshape(x.shape[0], -1).contiguous()
    columns = flat.shape[1]
    out = torch.empty(flat.shape, device=flat.device, dtype=torch.float32)
    n_seq = starts.numel() - 1
    bc = strip_columns(n_seq, columns)
    init_flat = init.reshape(init.shape[0], -1).float().contiguous() if init is not None else out
    _segment_cumsum_kernel[(n_seq, triton.cdiv(columns, bc))](
        flat, out, init_flat, starts, columns,
        BT=block_tokens, BC=bc, HAS_INIT=init is not None, REVERSE=reverse, WRAP=wrap,
        num_warps=WARPS, enable_fp_fusion=True,
    )  # fmt: skip
    return out.view(x.shape)
