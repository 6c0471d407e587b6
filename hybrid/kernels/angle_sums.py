"""The accumulated rotation angles of the Mamba-3 prefill, chunk-parallel, in Triton:

    φ_{t,h,s} = wrap(φ0_{seq,h,s} + Σ_{u ≤ t in its sequence} Δ_{u,h} θ_{u,s})

A serial walk over each sequence's tokens (`segment_cumsum`) is latency-bound: at one
sequence of 16,384 tokens it took 177-200 µs on an H100 for 67 MB of output (~25 µs of
bandwidth). Here the scan's chunks (sequence-aligned token blocks, `ChunkTable`) are summed
in parallel, the short sequence of chunk sums is scanned with `segment_cumsum`, and every
chunk then writes its own prefix sums from its carry, in parallel. The increments Δ·θ are
formed on the fly from their two factors and never stored.

Each chunk's sum is reduced to [−π, π) before the scan (a small sum stays small: wrapped to
[0, 2π), a slightly negative one would become ~2π and cost its float32 bits), and the chunk
scan sums CARRY_BLOCK chunks at a time, so partial sums stay within a few dozen radians as in
a serial walk over the tokens, and φ stays as exact over any length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.segment_cumsum import segment_cumsum
from hybrid.kernels.triton_math import centre_angle, wrap_angle

# (h, s) columns a program owns and its warps. H100, 1,024 columns, chunks of 64 / 16 tokens,
# us (graphs of 10 calls), every option of 32-128 columns × 1-4 warps: the sums took 11.3 /
# 7.8 at 64 / 128 columns on 1 warp (12.1 at 64 for 16-token chunks), the prefix sums 34.3 /
# 31.1 at 64 columns on 2 warps (the best within 1 µs at both); the whole angle sum 59-61 /
# 67-73 µs from 8 × 2048 to 1 × 16384 tokens, where the serial walk took 113-198 µs
SUMS_ELEMENTS, SUMS_WARPS = 4096, 1  # a (columns, tokens) tile of the sums: 64-128 columns
PREFIX_COLUMNS, PREFIX_WARPS = 64, 2
CARRY_BLOCK = 32  # chunk sums per step of the carry scan (see the module docstring)


@triton.jit
def _increments(delta_ptr, theta_ptr, tok0_ptr, ntok_ptr, c, cols, C, S, BT: tl.constexpr):
    """Δ_{t, col // S}·θ_{t, col % S} of chunk c's tokens as a (columns, tokens) tile (zero
    past the chunk's end), the tokens and the mask. Tokens run along the tile's second axis:
    sums and prefix sums along it stay within a thread and its warp (H100: the (tokens,
    columns) tile's axis-0 scan took 97 against 32 µs, its sum 78 µs, at 16,384 tokens)."""
    tok0 = tl.load(tok0_ptr + c).to(tl.int64)
    rows = tok0 + tl.arange(0, BT)
    mask = (cols < C)[:, None] & (tl.arange(0, BT) < tl.load(ntok_ptr + c))[None, :]
    delta = tl.load(delta_ptr + rows[None, :] * (C // S) + (cols // S)[:, None], mask=mask,
                    other=0.0)  # fmt: skip
    theta = tl.load(theta_ptr + rows[None, :] * S + (cols % S)[:, None], mask=mask, other=0.0)
    return delta * theta, rows, mask


@triton.jit
def _chunk_sums_kernel(delta_ptr, theta_ptr, tok0_ptr, ntok_ptr, out_ptr, C, S,
                       BT: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """Program (chunk, column strip): the chunk's increments summed, reduced to [−π, π)."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    inc, _, _ = _increments(delta_ptr, theta_ptr, tok0_ptr, ntok_ptr, c, cols, C, S, BT)
    tl.store(out_ptr + c.to(tl.int64) * C + cols, centre_angle(tl.sum(inc, 1)), mask=cols < C)


@triton.jit
def _chunk_prefix_kernel(delta_ptr, theta_ptr, tok0_ptr, ntok_ptr, chunk_seq_ptr,
                         seq_chunk0_ptr, carried_ptr, init_ptr, out_ptr, C, S,
                         BT: tl.constexpr, BC: tl.constexpr, HAS_INIT: tl.constexpr):  # fmt: skip
    """Program (chunk, column strip): φ of the chunk's tokens from the angle carried into it
    (the previous chunk's inclusive scan, or the sequence's initial angle)."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < C
    seq = tl.load(chunk_seq_ptr + c)
    if c == tl.load(seq_chunk0_ptr + seq):
        if HAS_INIT:
            carry = tl.load(init_ptr + seq.to(tl.int64) * C + cols, mask=col_ok, other=0.0)
        else:
            carry = tl.zeros([BC], dtype=tl.float32)
    else:
        carry = tl.load(carried_ptr + (c - 1).to(tl.int64) * C + cols, mask=col_ok, other=0.0)
    inc, rows, mask = _increments(delta_ptr, theta_ptr, tok0_ptr, ntok_ptr, c, cols, C, S, BT)
    phi = wrap_angle(carry[:, None] + tl.cumsum(inc, 1))
    tl.store(out_ptr + rows[None, :] * C + cols[:, None], phi, mask=mask)


def angle_sums(delta: Tensor, theta: Tensor, table: ChunkTable, angle0: Tensor | None) -> Tensor:
    """φ (T, H, S) float32 in [0, 2π) from Δ (T, H) and θ (T, S) (float32, contiguous), the
    layout's chunks and the initial angles (n_seq, H, S) or None. No autograd."""
    tokens, heads = delta.shape
    n_angles = theta.shape[1]
    columns = heads * n_angles
    n_chunks = table.n_chunks
    bt = triton.next_power_of_2(table.chunk_tokens)
    widest = triton.next_power_of_2(columns)
    f32 = {"device": delta.device, "dtype": torch.float32}
    sums = torch.empty(n_chunks, columns, **f32)
    bc = min(widest, 128, max(64, SUMS_ELEMENTS // bt))
    _chunk_sums_kernel[(n_chunks, triton.cdiv(columns, bc))](
        delta, theta, table.tok0, table.ntok, sums, columns, n_angles, BT=bt, BC=bc,
        num_warps=SUMS_WARPS, enable_fp_fusion=True,
    )  # fmt: skip
    init = angle0.reshape(angle0.shape[0], -1).float().contiguous() if angle0 is not None else None
    # inclusive per-sequence sums of the chunk sums, initial angles included
    carried = segment_cumsum(sums, table.seq_chunk0, init, wrap=True, block_tokens=CARRY_BLOCK)
    phi = torch.empty(tokens, columns, **f32)
    bc = min(widest, PREFIX_COLUMNS)
    _chunk_prefix_kernel[(n_chunks, triton.cdiv(columns, bc))](
        delta, theta, table.tok0, table.ntok, table.chunk_seq, table.seq_chunk0, carried,
        init if init is not None else sums, phi, columns, n_angles,
        BT=bt, BC=bc, HAS_INIT=init is not None, num_warps=PREFIX_WARPS, enable_fp_fusion=True,
    )  # fmt: skip
    return phi.view(tokens, heads, n_angles)
