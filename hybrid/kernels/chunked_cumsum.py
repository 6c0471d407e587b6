"""Per-sequence cumulative sums along the token axis, chunk-parallel, in Triton. The Mamba-3
prefill's rotation angles are the main user:

    φ_{t,h,s} = wrap(φ0_{seq,h,s} + Σ_{u ≤ t in its sequence} Δ_{u,h} θ_{u,s})

A serial walk over each sequence's tokens (`segment_cumsum`) is latency-bound, the more the
longer the sequences: for these angles at one sequence of 16,384 tokens it took 177-200 µs on
an H100 for 67 MB of output (~25 µs of bandwidth). Here the scan's chunks (sequence-aligned
token blocks, `ChunkTable`) are summed in parallel, the short per-sequence scan of the chunk
sums runs on `segment_cumsum`, and every chunk then writes its own prefix (or suffix) sums
from the sum carried into it, in parallel. An outer-product input (the angles' Δ·θ) is formed
on the fly from its two factors and never stored. Short sequences of a small batch (a
batch-1 prefill) are instead summed the same way, chunk by chunk, in one launch: one
program per sequence and strip of columns (`_sequence_sums_kernel`).

Wrapped sums (angles) reduce each chunk's sum to [−π, π) before the carry scan (a small sum
stays small: wrapped to [0, 2π), a slightly negative one would become ~2π and cost its
float32 bits), and that scan adds CARRY_BLOCK chunk sums at a time, so partial sums stay
within a few dozen radians as in a serial walk over the tokens, and φ stays as exact over any
length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.segment_cumsum import segment_cumsum
from hybrid.kernels.triton_math import centre_angle, wrap_angle

# (columns, tokens) tiles: the token axis runs inside a thread and its warp, so sums and
# prefix sums along it cost little; on (tokens, columns) tiles, a Triton reduction or scan
# along axis 0 crosses lanes and warps (H100, the angles at 16,384 tokens, chunks of 64: the
# chunk sums took 78 against 11 µs, the prefix sums 97 against 34). Columns a program owns
# and its warps, from a sweep of 32-128 columns × 1-4 warps (1,024 columns, chunks of 64 / 16
# tokens, graphs of 10 calls): the sums 11.3 / 7.8 µs at 64 / 128 columns on 1 warp (12.1 at
# 64 for 16-token chunks), the prefix sums 34.3 / 31.1 at 64 columns on 2 warps (within 1 µs
# of the best at both); the whole angle sum 59-61 / 67-73 µs from 8 × 2048 to 1 × 16384
# tokens, where the serial walk took 113-198 µs.
SUMS_ELEMENTS, SUMS_WARPS = 4096, 1  # a sums tile: 64-128 columns
PREFIX_COLUMNS, PREFIX_WARPS = 64, 2
CARRY_BLOCK = 32  # chunk sums per step of the carry scan (see the module docstring)
# Short sequences (at most CARRY_BLOCK chunks, WHOLE_SEQUENCE_TOKENS tokens padded) of a
# small batch (at most WHOLE_SEQUENCE_ELEMENTS sums) are summed by one program per sequence
# and strip of columns (`_sequence_sums_kernel`), the strips (1 to STRIP_COLUMNS columns, at
# most SEQUENCE_TILE values) as wide as give about SEQUENCE_PROGRAMS programs. H100, graphs
# of 10 calls, us, the three kernels -> one (the sweep's best strip, 4 warps): the angles at
# 1 x 512 tokens, 16 heads x 32, 8.7 -> 4.7 (8 columns), 4 x 512 9.7 -> 6.8 (16), but 64 x
# 512 48.7 -> 64.2; the reverse sums of 16 heads at 1 x 512 5.8 -> 2.8 (1), 32 x 512 6.5 ->
# 3.8 (4); of 32 heads at 64 x 1024 (2M sums: now the three kernels) 10.8 -> 10.3 (16
# columns, a tile that spills).
WHOLE_SEQUENCE_TOKENS, WHOLE_SEQUENCE_ELEMENTS = 1024, 1 << 20
SEQUENCE_PROGRAMS, STRIP_COLUMNS, STRIP_WARPS = 64, 16, 4
SEQUENCE_TILE = 8192  # values a program holds at most (offline ptxas: more spill)


@triton.jit
def _inputs(x_ptr, y_ptr, rows, cols, mask, C, YC, OUTER: tl.constexpr):
    """x[t, col] at the (broadcast) token rows and columns as float32, zero where masked; or
    with OUTER x[t, col // YC]·y[t, col % YC]."""
    if OUTER:
        x = tl.load(x_ptr + rows * (C // YC) + cols // YC, mask=mask, other=0.0)
        x *= tl.load(y_ptr + rows * YC + cols % YC, mask=mask, other=0.0)
    else:
        x = tl.load(x_ptr + rows * C + cols, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _chunk_values(x_ptr, y_ptr, tok0_ptr, ntok_ptr, c, cols, C, YC, BT: tl.constexpr,
                  OUTER: tl.constexpr):  # fmt: skip
    """Chunk c's inputs as a float32 (columns, tokens) tile, zero past its end (`_inputs`);
    and the tokens and the mask."""
    tok0 = tl.load(tok0_ptr + c).to(tl.int64)
    rows = tok0 + tl.arange(0, BT)
    mask = (cols < C)[:, None] & (tl.arange(0, BT) < tl.load(ntok_ptr + c))[None, :]
    return _inputs(x_ptr, y_ptr, rows[None, :], cols[:, None], mask, C, YC, OUTER), rows, mask


@triton.jit
def _chunk_sums_kernel(x_ptr, y_ptr, tok0_ptr, ntok_ptr, out_ptr, C, YC,
                       BT: tl.constexpr, BC: tl.constexpr, OUTER: tl.constexpr,
                       WRAP: tl.constexpr):  # fmt: skip
    """Program (chunk, column strip): the chunk's sum (WRAP: reduced to [−π, π))."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    x, _, _ = _chunk_values(x_ptr, y_ptr, tok0_ptr, ntok_ptr, c, cols, C, YC, BT, OUTER)
    total = tl.sum(x, 1)
    if WRAP:
        total = centre_angle(total)
    tl.store(out_ptr + c.to(tl.int64) * C + cols, total, mask=cols < C)


@triton.jit
def _chunk_prefix_kernel(x_ptr, y_ptr, tok0_ptr, ntok_ptr, chunk_seq_ptr, seq_chunk0_ptr,
                         carried_ptr, init_ptr, out_ptr, C, YC,
                         BT: tl.constexpr, BC: tl.constexpr, OUTER: tl.constexpr,
                         REVERSE: tl.constexpr, WRAP: tl.constexpr,
                         HAS_INIT: tl.constexpr):  # fmt: skip
    """Program (chunk, column strip): the chunk's prefix sums (REVERSE: suffix sums) from the
    sum carried into it: the scan of the chunk sums at the previous chunk (REVERSE: the
    next), or at a sequence's first chunk its initial value (REVERSE: at its last, zero)."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < C
    seq = tl.load(chunk_seq_ptr + c)
    if REVERSE:
        if c == tl.load(seq_chunk0_ptr + seq + 1) - 1:
            carry = tl.zeros([BC], dtype=tl.float32)
        else:
            carry = tl.load(carried_ptr + (c + 1).to(tl.int64) * C + cols, mask=col_ok, other=0.0)
    elif c == tl.load(seq_chunk0_ptr + seq):
        if HAS_INIT:
            carry = tl.load(init_ptr + seq.to(tl.int64) * C + cols, mask=col_ok, other=0.0)
        else:
            carry = tl.zeros([BC], dtype=tl.float32)
    else:
        carry = tl.load(carried_ptr + (c - 1).to(tl.int64) * C + cols, mask=col_ok, other=0.0)
    x, rows, mask = _chunk_values(x_ptr, y_ptr, tok0_ptr, ntok_ptr, c, cols, C, YC, BT, OUTER)
    if REVERSE:
        sums = (carry + tl.sum(x, 1))[:, None] - tl.cumsum(x, 1) + x
    else:
        sums = carry[:, None] + tl.cumsum(x, 1)
    if WRAP:
        sums = wrap_angle(sums)
    tl.store(out_ptr + rows[None, :] * C + cols[:, None], sums, mask=mask)


@triton.jit
def _sequence_sums_kernel(x_ptr, y_ptr, starts_ptr, init_ptr, out_ptr, C, YC, CHUNK,
                          NB: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                          OUTER: tl.constexpr, REVERSE: tl.constexpr, WRAP: tl.constexpr,
                          HAS_INIT: tl.constexpr):  # fmt: skip
    """Program (sequence, column strip): the whole sequence as one (columns, NB chunks, BT
    tokens) tile, its chunks the table's (CHUNK tokens each), summed as the chunked kernels
    sum them: each chunk's sum (WRAP: centred), the sums of the chunks before it (REVERSE:
    after it) as its carry, then the chunk's prefix (suffix) sums from that carry. One
    launch instead of three: short sequences (a batch-1 prefill) are bound by the
    launches, not by the bytes."""
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < C
    end = tl.load(starts_ptr + seq + 1)
    blocks = tl.arange(0, NB)
    i = tl.arange(0, BT)[None, :]
    # int32 offsets (fewer registers than int64): a call here has at most 1M sums
    rows = tl.load(starts_ptr + seq) + blocks[:, None] * CHUNK + i
    mask = col_ok[:, None, None] & ((rows < end) & (i < CHUNK))[None, :, :]
    x = _inputs(x_ptr, y_ptr, rows[None, :, :], cols[:, None, None], mask, C, YC, OUTER)
    block_sums = tl.sum(x, 2)  # (BC, NB)
    totals = centre_angle(block_sums) if WRAP else block_sums
    # [j, j']: chunk j' is carried into chunk j (before it; REVERSE: after it)
    later, earlier = blocks[None, :] > blocks[:, None], blocks[None, :] < blocks[:, None]
    carried = later if REVERSE else earlier
    carry = tl.sum(tl.where(carried[None, :, :], totals[:, None, :], 0.0), 2)
    if HAS_INIT:
        carry += tl.load(init_ptr + seq.to(tl.int64) * C + cols, mask=col_ok, other=0.0)[:, None]
    if WRAP:
        carry = wrap_angle(carry)
    if REVERSE:
        sums = (carry + block_sums)[:, :, None] - tl.cumsum(x, 2) + x
    else:
        sums = carry[:, :, None] + tl.cumsum(x, 2)
    if WRAP:
        sums = wrap_angle(sums)
    tl.store(out_ptr + rows[None, :, :] * C + cols[:, None, None], sums, mask=mask)


def sequence_strip(table: ChunkTable, tokens: int, columns: int) -> int:
    """Columns a program of the one-launch sums owns (`_sequence_sums_kernel`), or 0 where
    the call takes the three chunk-parallel kernels: sequences of more than CARRY_BLOCK
    chunks or WHOLE_SEQUENCE_TOKENS padded tokens, or more than WHOLE_SEQUENCE_ELEMENTS
    sums (see the constants)."""
    span = triton.next_power_of_2(table.longest) * triton.next_power_of_2(table.chunk_tokens)
    if (table.longest > CARRY_BLOCK or span > WHOLE_SEQUENCE_TOKENS
            or tokens * columns > WHOLE_SEQUENCE_ELEMENTS):  # fmt: skip
        return 0
    strip = table.n_seq * columns // SEQUENCE_PROGRAMS
    return min(triton.next_power_of_2(columns), STRIP_COLUMNS, SEQUENCE_TILE // span,
               1 << max(0, strip.bit_length() - 1))  # fmt: skip


def chunked_cumsum(
    x: Tensor | tuple[Tensor, Tensor],
    table: ChunkTable,
    init: Tensor | None = None,
    reverse: bool = False,
    wrap: bool = False,
) -> Tensor:
    """Per sequence of the layout `table`: init[i] + Σ_{s≤t} x_s (reverse: Σ_{s≥t}, no init),
    optionally wrapped to [0, 2π). x: (T, ...) -> float32 of the same shape; or a pair of
    float32 factors (T, A), (T, B) standing for their outer product (T, A, B). No autograd."""
    if init is not None and reverse:
        raise ValueError("chunked_cumsum: an initial value only goes with a forward sum")
    outer = isinstance(x, tuple)
    if outer:
        left, right = (t.float().contiguous() for t in x)
        shape = (*left.shape, right.shape[1])
        inner = right.shape[1]
    else:
        left = right = x.reshape(x.shape[0], -1).contiguous()
        shape, inner = x.shape, 1
    tokens, columns = shape[0], left.shape[1] * inner
    widest = triton.next_power_of_2(columns)
    f32 = {"device": left.device, "dtype": torch.float32}
    init = init.reshape(init.shape[0], -1).float().contiguous() if init is not None else None
    out = torch.empty(tokens, columns, **f32)
    bt = triton.next_power_of_2(table.chunk_tokens)
    bc = sequence_strip(table, tokens, columns)
    if bc:
        _sequence_sums_kernel[(table.n_seq, triton.cdiv(columns, bc))](
            left, right, table.seq_starts, init if init is not None else out, out, columns,
            inner, table.chunk_tokens, NB=triton.next_power_of_2(table.longest), BT=bt, BC=bc,
            OUTER=outer, REVERSE=reverse, WRAP=wrap, HAS_INIT=init is not None,
            num_warps=STRIP_WARPS, enable_fp_fusion=True,
        )  # fmt: skip
        return out.view(shape)
    n_chunks = table.n_chunks
    sums = torch.empty(n_chunks, columns, **f32)
    bc = min(widest, 128, max(64, SUMS_ELEMENTS // bt))
    _chunk_sums_kernel[(n_chunks, triton.cdiv(columns, bc))](
        left, right, table.tok0, table.ntok, sums, columns, inner, BT=bt, BC=bc, OUTER=outer,
        WRAP=wrap, num_warps=SUMS_WARPS, enable_fp_fusion=True,
    )  # fmt: skip
    # inclusive per-sequence scans of the chunk sums (initial values included)
    carried = segment_cumsum(sums, table.seq_chunk0, init, reverse, wrap, CARRY_BLOCK)
    bc = min(widest, PREFIX_COLUMNS)
    _chunk_prefix_kernel[(n_chunks, triton.cdiv(columns, bc))](
        left, right, table.tok0, table.ntok, table.chunk_seq, table.seq_chunk0, carried,
        init if init is not None else sums, out, columns, inner,
        BT=bt, BC=bc, OUTER=outer, REVERSE=reverse, WRAP=wrap, HAS_INIT=init is not None,
        num_warps=PREFIX_WARPS, enable_fp_fusion=True,
    )  # fmt: skip
    return out.view(shape)
