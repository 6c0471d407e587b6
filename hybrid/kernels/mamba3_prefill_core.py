"""Triton kernels for the Mamba-3 scan core in chunked form, forward and backward.

The core is the G-form of chunked.py with the MIMO rank folded into the rows: per sequence
and head, rows i = (token τ(i), rank r) in token-major order, per-token log α a_τ, scale s_τ
(= γ_τ + β'_{τ+1}) and γ_τ, and with A_i the cumulative log α since the sequence start
(for MIMO the forward kernels form the value rows v_i = mimo_x[r] ⊙ x_τ where they load
them, so the forward neither writes nor keeps an R-fold v; the backward materialises it for
the chunk gradients and reduces their dv to dx and d mimo_x, `mimo_values`):

    y_i = Σ_{j: τ(j) ≤ τ(i)} e^{A_i − A_j} w_ij (q_i·k_j) v_j + e^{A_i} G_0 q_i + D v_i
    w_ij = s_τ(j) if τ(j) < τ(i), γ_τ(j) if τ(j) = τ(i)
    G_T  = Σ_j e^{A_T − A_j} s_τ(j) v_j k_jᵀ + e^{A_T} G_0   (s of a sequence's last token is γ)

Three kernels:
  state_pass    per (sequence, head, state tile), walks the sequence's chunks carrying the
                state: stores the state entering each chunk, adds the chunk's own term
                Σ_j e^{A_end − A_j} s_j v_j k_jᵀ and decays; REVERSE walks backwards carrying
                the state gradient (terms Σ_i e^{A_i} dy_i q_iᵀ);
  chunk_output  per (chunk, head): y = intra-chunk scores plus the start state's read-out;
  chunk_grad    per (chunk, head): dq, dk, dv and the per-row gradients of A, s and γ.
The log-decay gradient uses dA_i = q_i·dq_i − k_i·dk_i (every pairwise term depends on
A_i − A_j), reverse-summed over the sequence by the caller. The D skip (optional) is added
where the output is formed, so no later kernel reads x again for it, and its gradient joins
dv in the product with the intra-chunk mixing matrix (on its diagonal). Sequences are lists
of chunks (`ChunkTable`), so a varlen batch is one flat token axis and no chunk crosses a
boundary.
"""

from __future__ import annotations

import inspect
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.devices import multiprocessors
from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.chunked_cumsum import chunked_cumsum
from hybrid.kernels.launch_args import pointer_or, token_major
from hybrid.kernels.mamba3_gate import gate_rows
from hybrid.kernels.mimo_values import mimo_values, mimo_values_grad
from hybrid.kernels.projection_grads import gradient_output
from hybrid.kernels.triton_math import dot_precision

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# HYBRID_TRITON_AUTOTUNE=0 compiles one config per kernel (the test suites: many shapes)
AUTOTUNE = os.environ.get("HYBRID_TRITON_AUTOTUNE", "1") != "0" and not INTERPRETING


# what the autotuner chooses among (num_warps, num_stages); the GPU tests run every one
CANDIDATE_CONFIGS = tuple(
    triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)
)
UNTUNED_CONFIG = triton.Config({}, num_warps=4, num_stages=2)
# state columns per step of the chunk-gradient kernel's loops. With 64, and the end-state
# product in the first loop, it ran at 255 registers and spilled (260 B a thread with Triton
# 3.6, `experiments/bench/kernel_resources.py`); 32 and that product moved into the second
# loop (no spill) took it from 263 to 223 us for a 21M hybrid's layer and from 723 to 611 us
# at 8 x 2048 tokens, 32 heads (H100, bf16, N=128; R=4 2.29 -> 2.24 ms; BENCHMARKS.md)
GRAD_BLOCK_N = 32
# a segmented state pass (`state_pass_segments`): programs it aims for per SM, the fewest
# chunks a segment walks, and the fewest segments worth the fix-up pass
SEGMENT_PROGRAMS_PER_SM = 4
MIN_SEGMENT_CHUNKS = 4
MIN_SEGMENTS = 4


def _configs() -> list[triton.Config]:
    """The candidates, or one (interpreter: each config is a rerun)."""
    return list(CANDIDATE_CONFIGS) if AUTOTUNE else [UNTUNED_CONFIG]


def _autotune(key: list[str]):
    """triton.autotune over `_configs()`; the winners persist in Triton's cache directory
    (cache_results, where this Triton has it), so a new process does not re-tune."""
    persist = "cache_results" in inspect.signature(triton.autotune).parameters
    return triton.autotune(
        configs=_configs(), key=key, **({"cache_results": True} if persist else {})
    )


@triton.jit
def _row_layout(tok0, ntok, R: tl.constexpr, BT: tl.constexpr):
    """Rows of the chunk whose first token is tok0 (int64) and which has ntok tokens: their
    flat row index (token·R + rank), token, and validity."""
    i = tl.arange(0, BT)
    tok = i // R
    valid = tok < ntok
    return tok0 * R + i, tok0 + tok, tok, valid, i % R == 0


@triton.jit
def _cumulative_log_alpha(a_ptr, tokens, h, H, valid, first_rank):
    """A_i since the chunk start (each token's log α counted once, on its first rank)."""
    a = tl.load(a_ptr + tokens * H + h, mask=valid & first_rank, other=0.0)
    return tl.cumsum(a, 0), tl.sum(a, 0)


@triton.jit
def _chunk_setup(tok0, ntok, a_ptr, s_ptr, g_ptr, h, H, R: tl.constexpr, BT: tl.constexpr):
    """The chunk at tok0 (ntok tokens), head h: row layout, cumulative log α, its chunk
    total, and per-row s and γ."""
    rows, tokens, tok, valid, first = _row_layout(tok0, ntok, R, BT)
    cum, total = _cumulative_log_alpha(a_ptr, tokens, h, H, valid, first)
    s = tl.load(s_ptr + tokens * H + h, mask=valid, other=0.0)
    g = tl.load(g_ptr + tokens * H + h, mask=valid, other=0.0)
    return rows, tokens, tok, valid, cum, total, s, g


@triton.jit
def _token_weights(cum, s, g, tok, valid):
    """w_ij e^{A_i − A_j} of the intra-chunk scores, and the strict-lower mask."""
    below = tok[:, None] > tok[None, :]
    same = (tok[:, None] == tok[None, :]) & valid[None, :]
    decay = tl.exp(tl.where(below, cum[:, None] - cum[None, :], 0.0))
    w = tl.where(below, decay * s[None, :], tl.where(same, g[None, :], 0.0))
    return w, below, same, decay


@triton.jit
def _diagonal(BT: tl.constexpr):
    """(BT, BT) True where the row is the column."""
    i = tl.arange(0, BT)
    return i[:, None] == i[None, :]


@triton.jit
def _with_skip(mix, d_ptr, h, BT: tl.constexpr, HAS_D: tl.constexpr):
    """The intra-chunk mixing matrix with the D skip on its diagonal, so dv_i gains D·dy_i in
    the product that is there anyway (no extra registers: in the chunk gradients, unlike
    the forward, this form cost nothing on an H100)."""
    if HAS_D:
        mix += tl.where(_diagonal(BT), tl.load(d_ptr + h).to(tl.float32), 0.0)
    return mix


@triton.jit
def _stored_values(v_ptr, rows, tokens, SV, h, H, cols, valid, R: tl.constexpr,
                   P: tl.constexpr):  # fmt: skip
    """Value rows of head h at columns `cols` from v (T, R, H, P) with token stride SV (v may
    be a slice of in_proj) and contiguous (rank, head, P) entries."""
    offs = tokens * SV + (rows - tokens * R) * (H * P) + h * P
    return tl.load(v_ptr + offs[:, None] + cols[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _values(v_ptr, mx_ptr, tok0, ntok, rows, tokens, SV, h, H, cols, valid,
            R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, C: tl.constexpr,
            HAS_MX: tl.constexpr):  # fmt: skip
    """Value rows of the chunk at tok0 (ntok tokens), head h, at columns `cols` (C of them).
    HAS_MX forms the MIMO rows x̃_(τ,r) = mimo_x[h, r] ⊙ x_τ from x (T, H, P) with token
    stride SV and mimo_x (H, R, P) fp32: x is read once per token, not per rank, and the rows
    are rounded to x's dtype as a stored x̃ would be. Otherwise v holds the rows
    (`_stored_values`)."""
    if HAS_MX:
        t = tl.arange(0, BT // R)
        ok = t < ntok
        x = tl.load(v_ptr + ((tok0 + t) * SV + h * P)[:, None] + cols[None, :],
                    mask=ok[:, None], other=0.0)  # fmt: skip
        m = tl.load(mx_ptr + ((h * R + tl.arange(0, R)) * P)[:, None] + cols[None, :])
        m = m.to(tl.float32)  # mimo_x as stored (a bf16 model's: no conversion kernel)
        v = tl.reshape((x.to(tl.float32)[:, None, :] * m[None, :, :]).to(x.dtype), [BT, C])
    else:
        v = _stored_values(v_ptr, rows, tokens, SV, h, H, cols, valid, R, P)
    return v


@triton.jit
def _pass_program(NSEG, DX: tl.constexpr, DY: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr):
    """A state-pass program's sequence, segment, head and DX×DY tile (offsets, row, column)."""
    n_y_tiles: tl.constexpr = DY // BY
    ox = (tl.program_id(2) // n_y_tiles) * BX + tl.arange(0, BX)
    oy = (tl.program_id(2) % n_y_tiles) * BY + tl.arange(0, BY)
    tile = ox[:, None] * DY + oy[None, :]
    return tl.program_id(0) // NSEG, tl.program_id(0) % NSEG, tl.program_id(1), tile, ox, oy


@triton.jit
def _sequence_chunks(seq_starts_ptr, seq_chunk0_ptr, seq):
    """The sequence's first chunk, chunk count, first token and end token. Its chunks are
    consecutive blocks of BT // R tokens from its first token: an arithmetic layout (no
    per-chunk table load), so a walk's loads depend on no other load and Triton's pipeliner
    can issue them further ahead."""
    c0 = tl.load(seq_chunk0_ptr + seq)
    n_chunks = tl.load(seq_chunk0_ptr + seq + 1) - c0
    first_token = tl.load(seq_starts_ptr + seq).to(tl.int64)
    return c0, n_chunks, first_token, tl.load(seq_starts_ptr + seq + 1)


@triton.jit
def _walk_step(step, n_chunks, first_token, end_token, R: tl.constexpr, BT: tl.constexpr,
               REVERSE: tl.constexpr):  # fmt: skip
    """Step `step` of a walk over a sequence's chunks (last to first with REVERSE): the chunk
    index within the sequence, its first token and its token count."""
    i = n_chunks - 1 - step if REVERSE else step
    tok0 = first_token + i * (BT // R)
    return i, tok0, tl.minimum(end_token - tok0, BT // R)


@_autotune(["DX", "DY", "R", "BT", "BX", "BY", "REVERSE", "HAS_MX"])
@triton.jit
def _state_pass_kernel(
    x_ptr,
    mx_ptr,
    y_ptr,
    a_ptr,
    s_ptr,
    states_ptr,
    init_ptr,
    final_ptr,
    seg_carry_ptr,
    seg_decay_ptr,
    seq_starts_ptr,
    seq_chunk0_ptr,
    H,
    SX,
    NSEG,
    SEG,
    DX: tl.constexpr,
    DY: tl.constexpr,
    R: tl.constexpr,
    BT: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    HAS_INIT: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_MX: tl.constexpr,
    SEGMENTED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (sequence, segment, head, DX×DY tile): carry S across the segment's chunks,
    storing the S that enters each chunk, then S ← e^{A_end}·S + Σ_i coef_i x_iᵀ y_i (the
    chunk's term).

    Forward: x = v, y = k, coef = e^{A_end − A_i} s_i; states[c] is chunk c's start state.
    REVERSE (chunks last to first): x = dy, y = q, coef = e^{A_i}; states[c] is the gradient
    of chunk c's end state, and the final carry is the initial state's gradient. SX is x's
    token stride (v may be a slice of in_proj; with HAS_MX, x is the MIMO x, `_values`); y is
    contiguous.

    A segment is SEG consecutive chunks in walk order (NSEG segments a sequence). Without
    SEGMENTED there is one, and the last carry is stored in `final`. With it, every segment
    but the first starts from zero: its carry and its summed log-decay go to seg_carry and
    seg_decay, and `_state_fixup_kernel` adds the carry entering the segment to its states.
    """
    seq, seg, h, tile, ox, oy = _pass_program(NSEG, DX, DY, BX, BY)
    edge = (seq.to(tl.int64) * H + h) * (DX * DY)
    carry = tl.zeros([BX, BY], tl.float32)
    if HAS_INIT:
        first_segment = tile < tl.where(seg == 0, DX * DY, 0)
        carry += tl.load(init_ptr + edge + tile, mask=first_segment, other=0.0)
    c0, n_chunks, first_token, end_token = _sequence_chunks(seq_starts_ptr, seq_chunk0_ptr, seq)
    log_decay = 0.0
    for step in range(seg * SEG, tl.minimum(seg * SEG + SEG, n_chunks)):
        i, tok0, ntok = _walk_step(step, n_chunks, first_token, end_token, R, BT, REVERSE)
        c = c0 + i
        rows, tokens, _, valid, first = _row_layout(tok0, ntok, R, BT)
        cum, total = _cumulative_log_alpha(a_ptr, tokens, h, H, valid, first)
        log_decay += total
        if REVERSE:
            coef = tl.where(valid, tl.exp(cum), 0.0)
        else:
            s = tl.load(s_ptr + tokens * H + h, mask=valid, other=0.0)
            coef = tl.exp(total - cum) * s
        xs = _values(x_ptr, mx_ptr, tok0, ntok, rows, tokens, SX, h, H, ox, valid, R, DX, BT,
                     BX, HAS_MX)  # fmt: skip
        ys = tl.load(
            y_ptr + rows[:, None] * (H * DY) + h * DY + oy[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        chunk_tile = states_ptr + (c.to(tl.int64) * H + h) * (DX * DY) + tile
        tl.store(chunk_tile, carry.to(states_ptr.dtype.element_ty))
        xs = (xs * coef[:, None]).to(ys.dtype)
        carry = tl.exp(total) * carry + tl.dot(tl.trans(xs), ys, input_precision=PRECISION)
    if SEGMENTED:
        at = (seq * NSEG + seg).to(tl.int64) * H + h
        here = tl.where(seg * SEG < n_chunks, DX * DY, 0)  # a shorter sequence has fewer
        tl.store(seg_carry_ptr + at * (DX * DY) + tile, carry, mask=tile < here)
        one = tl.arange(0, 1)
        tl.store(seg_decay_ptr + at + one, log_decay + tl.zeros([1], tl.float32),
                 mask=one < tl.where(tl.program_id(2) == 0, here, 0))  # fmt: skip
    else:
        tl.store(final_ptr + edge + tile, carry)


@triton.jit
def _state_fixup_kernel(
    states_ptr, final_ptr, seg_carry_ptr, seg_decay_ptr, a_ptr, seq_starts_ptr, seq_chunk0_ptr,
    H, NSEG, SEG, DX: tl.constexpr, DY: tl.constexpr, R: tl.constexpr, BT: tl.constexpr,
    BX: tl.constexpr, BY: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """One (sequence, segment, head, tile) of a segmented state pass: the carry entering the
    segment, C = e^{decay of segment s}·C + carry of s over the segments before it, added to
    each state the segment stored, scaled by the decay from the segment's start to it
    (states[j] += e^{Σ_{start ≤ i < j} A_i}·C, walk order); the sequence's last segment
    stores its final carry, e^{its decay}·C + its own carry. No chunk term is recomputed: a
    chunk costs its log-decays' load, the state tile's load, an FMA and a store."""
    seq, seg, h, tile, _ox, _oy = _pass_program(NSEG, DX, DY, BX, BY)
    c0, n_chunks, first_token, end_token = _sequence_chunks(seq_starts_ptr, seq_chunk0_ptr, seq)
    seq_segs = (seq * NSEG).to(tl.int64)
    entering = tl.zeros([BX, BY], tl.float32)
    for before in range(0, tl.minimum(seg, tl.cdiv(n_chunks, SEG))):
        at = (seq_segs + before) * H + h
        carried = tl.load(seg_carry_ptr + at * (DX * DY) + tile)
        entering = tl.exp(tl.load(seg_decay_ptr + at)) * entering + carried
    log_decay = 0.0
    start = seg * SEG
    stop = tl.where(seg == 0, start, tl.minimum(start + SEG, n_chunks))  # the first is exact
    for step in range(start, stop):
        i, tok0, ntok = _walk_step(step, n_chunks, first_token, end_token, R, BT, REVERSE)
        _rows, tokens, _tok, valid, first = _row_layout(tok0, ntok, R, BT)
        _cum, total = _cumulative_log_alpha(a_ptr, tokens, h, H, valid, first)
        state = states_ptr + ((c0 + i).to(tl.int64) * H + h) * (DX * DY) + tile
        local = tl.load(state).to(tl.float32)
        tl.store(state, (local + tl.exp(log_decay) * entering).to(states_ptr.dtype.element_ty))
        log_decay += total
    last = tile < tl.where(start < n_chunks, tl.where(start + SEG >= n_chunks, DX * DY, 0), 0)
    at = (seq_segs + seg) * H + h
    own = tl.load(seg_carry_ptr + at * (DX * DY) + tile, mask=last, other=0.0)
    edge = (seq.to(tl.int64) * H + h) * (DX * DY)
    tl.store(final_ptr + edge + tile, tl.exp(log_decay) * entering + own, mask=last)


@_autotune(["N", "P", "R", "BT", "BN", "BP", "HAS_MX", "HAS_D", "GATE", "GATE_MIMO", "HAS_NORM"])
@triton.jit
def _chunk_output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mx_ptr,
    a_ptr,
    s_ptr,
    g_ptr,
    d_ptr,
    states_ptr,
    y_ptr,
    tok0_ptr,
    ntok_ptr,
    z_ptr,
    mz_ptr,
    mo_ptr,
    w_ptr,
    H,
    SV,
    SZ,
    eps,
    N: tl.constexpr,
    P: tl.constexpr,
    R: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BP: tl.constexpr,
    HAS_MX: tl.constexpr,
    HAS_D: tl.constexpr,
    GATE: tl.constexpr,
    GATE_MIMO: tl.constexpr,
    HAS_NORM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y of one (chunk, head, column block); with GATE (BP = P) the output stage instead
    (`mamba3_gate.gate_rows` of y rounded as stored, the ranks summed): o (T, H, P) into
    y_ptr, from z (token stride SZ), mimo_z, mimo_o (H, R, P) and the norm weight (H, P)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    op = tl.program_id(2) * BP + tl.arange(0, BP)
    tok0, ntok = tl.load(tok0_ptr + c).to(tl.int64), tl.load(ntok_ptr + c)
    rows, tokens, tok, valid, cum, _, s, g = _chunk_setup(tok0, ntok, a_ptr, s_ptr, g_ptr, h,
                                                          H, R, BT)  # fmt: skip
    state_base = (c.to(tl.int64) * H + h) * (P * N)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    readout = tl.zeros([BT, BP], dtype=tl.float32)
    for n0 in range(0, N, BN):
        on = n0 + tl.arange(0, BN)
        qk_offs = rows[:, None] * (H * N) + h * N + on[None, :]
        q = tl.load(q_ptr + qk_offs, mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + qk_offs, mask=valid[:, None], other=0.0)
        scores += tl.dot(q, tl.trans(k), input_precision=PRECISION)
        st = tl.load(states_ptr + state_base + op[:, None] * N + on[None, :]).to(q.dtype)
        readout += tl.dot(q, tl.trans(st), input_precision=PRECISION)
    w, _, _, _ = _token_weights(cum, s, g, tok, valid)
    v = _values(v_ptr, mx_ptr, tok0, ntok, rows, tokens, SV, h, H, op, valid, R, P, BT, BP,
                HAS_MX)  # fmt: skip
    y = tl.exp(cum)[:, None] * readout
    y += tl.dot((scores * w).to(v.dtype), v, input_precision=PRECISION)
    if HAS_D:  # after the product: on its diagonal, MIMO's forward was 12% slower (H100)
        y += tl.load(d_ptr + h).to(tl.float32) * v.to(tl.float32)
    if GATE:
        _store_gated(y.to(v.dtype).to(tl.float32), z_ptr, mz_ptr, mo_ptr, w_ptr, y_ptr, tok0,
                     ntok, h, H, SZ, op, eps, P, R, BT, GATE_MIMO, HAS_NORM)  # fmt: skip
    else:
        tl.store(
            y_ptr + rows[:, None] * (H * P) + h * P + op[None, :],
            y.to(y_ptr.dtype.element_ty),
            mask=valid[:, None],
        )


@triton.jit
def _store_gated(y, z_ptr, mz_ptr, mo_ptr, w_ptr, o_ptr, tok0, ntok, h, H, SZ, op, eps,
                 P: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, GATE_MIMO: tl.constexpr,
                 HAS_NORM: tl.constexpr):  # fmt: skip
    """o of the chunk's tokens: its rows (token-major, R ranks a token) gated, ranks summed."""
    t = tl.arange(0, BT // R)
    ok = t < ntok
    z = tl.load(z_ptr + ((tok0 + t) * SZ + h * P)[:, None] + op[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)  # fmt: skip
    z = tl.reshape(tl.broadcast_to(z[:, None, :], [BT // R, R, P]), [BT, P])
    w = tl.load(w_ptr + h * P + op).to(tl.float32)[None, :] if HAS_NORM else y
    weights = ((h * R + tl.arange(0, BT) % R) * P)[:, None] + op[None, :]
    mz = tl.load(mz_ptr + weights).to(tl.float32) if GATE_MIMO else y
    mo = tl.load(mo_ptr + weights).to(tl.float32) if GATE_MIMO else y
    gated = gate_rows(y, z, mz, mo, w, eps, P, GATE_MIMO, HAS_NORM)
    o = tl.sum(tl.reshape(gated, [BT // R, R, P]), 1) if R > 1 else gated
    tl.store(o_ptr + ((tok0 + t) * H + h)[:, None] * P + op[None, :],
             o.to(o_ptr.dtype.element_ty), mask=ok[:, None])  # fmt: skip


@_autotune(["N", "P", "R", "BT", "BN", "HAS_D"])
@triton.jit
def _chunk_grad_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dy_ptr,
    a_ptr,
    s_ptr,
    g_ptr,
    d_ptr,
    states_ptr,
    dstates_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    da_ptr,
    ds_ptr,
    dg_ptr,
    dd_ptr,
    tok0_ptr,
    ntok_ptr,
    H,
    SV,
    SDV,
    N: tl.constexpr,
    P: tl.constexpr,
    R: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    HAS_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Gradients of one chunk, given its start state and the gradient of its end state; with
    HAS_D, this chunk's part of dD (dd, (n_chunks, H)). dv's rows have stride SDV (SISO: a
    slice of in_proj's gradient)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tok0, ntok = tl.load(tok0_ptr + c).to(tl.int64), tl.load(ntok_ptr + c)
    rows, tokens, tok, valid, cum, total, s, g = _chunk_setup(tok0, ntok, a_ptr, s_ptr, g_ptr,
                                                              h, H, R, BT)  # fmt: skip
    op = tl.arange(0, P)
    pv_offs = rows[:, None] * (H * P) + h * P + op[None, :]
    v = _stored_values(v_ptr, rows, tokens, SV, h, H, op, valid, R, P)
    dy = tl.load(dy_ptr + pv_offs, mask=valid[:, None], other=0.0)
    state_base = (c.to(tl.int64) * H + h) * (P * N)

    # the intra-chunk terms first, so that few (BT, BT) tiles are live at once
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for n0 in range(0, N, BN):
        on = n0 + tl.arange(0, BN)
        qk_offs = rows[:, None] * (H * N) + h * N + on[None, :]
        q = tl.load(q_ptr + qk_offs, mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + qk_offs, mask=valid[:, None], other=0.0)
        scores += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    w, below, same, decay = _token_weights(cum, s, g, tok, valid)
    dmix = tl.dot(dy, tl.trans(v), input_precision=PRECISION)  # dy_i · v_j
    if HAS_D:  # Σ_i dy_i·v_i: the diagonal of dmix
        diagonal = tl.where(_diagonal(BT), dmix, 0.0)
        tl.store(dd_ptr + c * H + h, tl.sum(tl.sum(diagonal, 1), 0))
    mix = _with_skip(scores * w, d_ptr, h, BT, HAS_D)
    dv = tl.dot(tl.trans(mix.to(dy.dtype)), dy, input_precision=PRECISION)
    weighted = dmix * scores
    ds = tl.sum(tl.where(below, decay * weighted, 0.0), 0)
    dg = tl.sum(tl.where(same, weighted, 0.0), 0)
    d_scores = (dmix * w).to(dy.dtype)  # the products below take it in the input dtype

    # dq, dk and the end state's term k_j · dG_end (for dv and ds) over the state's columns
    coef_end = tl.where(valid, tl.exp(total - cum), 0.0)
    coef = coef_end * s
    e_start = tl.exp(cum)
    to_end = tl.zeros([BT, P], dtype=tl.float32)
    da = tl.zeros([BT], dtype=tl.float32)
    for n0 in range(0, N, BN):
        on = n0 + tl.arange(0, BN)
        qk_offs = rows[:, None] * (H * N) + h * N + on[None, :]
        q = tl.load(q_ptr + qk_offs, mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + qk_offs, mask=valid[:, None], other=0.0)
        st = tl.load(states_ptr + state_base + op[:, None] * N + on[None, :]).to(q.dtype)
        dse = tl.load(dstates_ptr + state_base + op[:, None] * N + on[None, :]).to(q.dtype)
        to_end += tl.dot(k, tl.trans(dse), input_precision=PRECISION)
        dq = tl.dot(d_scores, k, input_precision=PRECISION)
        dq += e_start[:, None] * tl.dot(dy, st, input_precision=PRECISION)
        tl.store(dq_ptr + qk_offs, dq.to(dq_ptr.dtype.element_ty), mask=valid[:, None])
        dk = tl.dot(tl.trans(d_scores), q, input_precision=PRECISION)
        dk += coef[:, None] * tl.dot(v, dse, input_precision=PRECISION)
        tl.store(dk_ptr + qk_offs, dk.to(dk_ptr.dtype.element_ty), mask=valid[:, None])
        da += tl.sum(q.to(tl.float32) * dq - k.to(tl.float32) * dk, 1)
    dv += coef[:, None] * to_end
    tl.store(dv_ptr + (rows * SDV + h * P)[:, None] + op[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=valid[:, None])  # fmt: skip
    ds += coef_end * tl.sum(v.to(tl.float32) * to_end, 1)
    row_offs = rows * H + h
    tl.store(da_ptr + row_offs, da, mask=valid)
    tl.store(ds_ptr + row_offs, ds, mask=valid)
    tl.store(dg_ptr + row_offs, dg, mask=valid)


def _new_output(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Every kernel output comes from here (the GPU tests poison it with NaN)."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def state_pass_columns(pairs: int) -> int:
    """State columns a state-pass program carries, from the number of (sequence, head)
    pairs: each program walks its pair's chunks in order, so few pairs need narrow tiles to
    fill the SMs, and many pairs run faster with whole rows (fewer programs each loading the
    chunk's decays and rows). Both passes of a forward+backward, H100, N=128, bf16, µs:
    32 × 512 tokens, 32 heads (1,024 pairs) 344 with 64 columns, 285 with 128; 8 × 2048
    (256 pairs) 261 → 252, R=4 943 → 923; 1 × 16384 (32 pairs) 756 with 32, 997 with 128."""
    return 128 if pairs >= 256 else 64 if pairs >= 128 else 32


def state_pass_segments(programs: int, chunks: int, sms: int) -> int:
    """Segments a sequence's state pass is cut into. One program walks its chunks one after
    another, each step waiting on the last, so with few programs (batch-1 prefill) the pass
    takes that chain's length: a 21M hybrid's batch-1 prefill (12 heads: 48 programs) spent
    31% of its kernel time there at 2,048 tokens, 42% at 8,192. Segments walked in parallel
    (each at least MIN_SEGMENT_CHUNKS long) and a fix-up pass over the stored states took
    those passes from 416 to 221 us and from 1,806 to 777 us, the whole prefill's kernels
    from 1,327 to 1,133 and from 4,279 to 3,291 us (H100). With more programs the fix-up's
    traffic outweighs the shorter walks: 128 programs (1 x 16384, 32 heads) were 11% slower
    segmented (R=4: 19%), so only up to half as many programs as SMs are cut. Segments of 4
    chunks beat 8, and 2 segments never beat 1 (the fix-up's launch): one sequence, 16
    heads, 64 programs, µs for 1 / 2 / 4 / 8 segments: 512 tokens 9.5 / 12.1 / 10.2 / 10.6,
    1,024 tokens 17.2 / 19.1 / 14.2 / 14.4, 2,048 tokens 31.4 / 35.8 / 24.3 / 19.4; R=4 at
    512 tokens (32 chunks) 31.6 / 29.6 / 20.4 / 17.8."""
    if programs > sms // 2:
        return 1
    segments = min(triton.cdiv(SEGMENT_PROGRAMS_PER_SM * sms, programs),
                   chunks // MIN_SEGMENT_CHUNKS)  # fmt: skip
    return segments if segments >= MIN_SEGMENTS else 1


def _state_pass(x, mx, y, a, s, init, table: ChunkTable, rank, chunk_rows, reverse):
    """Per-chunk carries (n_chunks, H, DX, DY) and the carry after the last chunk (fp32).
    x is (T, R, H, DX), or with mx (MIMO weights (H, R, DX)) the (T, H, DX) x they scale.

    The carries are stored in y's dtype: the kernels that read them round them to it before
    their tensor-core products anyway, so bf16 storage halves the traffic and changes no
    result. The carry itself accumulates in float32 registers (a segmented pass adds the
    carry entering a segment to its stored states, rounding them once more)."""
    heads, dx, dy = x.shape[-2], x.shape[-1], y.shape[-1]
    states = torch.empty(table.n_chunks, heads, dx, dy, device=x.device, dtype=y.dtype)
    final = torch.empty(table.n_seq, heads, dx, dy, device=x.device, dtype=torch.float32)
    by = min(dy, state_pass_columns(table.n_seq * heads))
    bx = min(dx, 64)
    tiles = (dx // bx) * (dy // by)
    segments = state_pass_segments(
        table.n_seq * heads * tiles, table.longest, multiprocessors(x.device)
    )
    seg_len = triton.cdiv(table.longest, segments)
    n_seg = triton.cdiv(table.longest, seg_len)
    f32 = {"device": x.device, "dtype": torch.float32}
    seg_carry = torch.empty(table.n_seq, n_seg, heads, dx, dy, **f32) if n_seg > 1 else final
    seg_decay = torch.empty(table.n_seq, n_seg, heads, **f32) if n_seg > 1 else final
    grid = (table.n_seq * n_seg, heads, tiles)
    shapes = {"DX": dx, "DY": dy, "R": rank, "BT": chunk_rows, "BX": bx, "BY": by,
              "REVERSE": reverse}  # fmt: skip
    _state_pass_kernel[grid](
        x, pointer_or(mx, s), y, a, s, states, pointer_or(init, final), final, seg_carry,
        seg_decay, table.seq_starts, table.seq_chunk0, heads, x.stride(0), n_seg, seg_len,
        HAS_INIT=init is not None, HAS_MX=mx is not None, SEGMENTED=n_seg > 1,
        PRECISION=dot_precision(x.dtype), enable_fp_fusion=True, **shapes,
    )  # fmt: skip
    if n_seg > 1:
        _state_fixup_kernel[grid](
            states, final, seg_carry, seg_decay, a, table.seq_starts, table.seq_chunk0, heads,
            n_seg, seg_len, num_warps=4, enable_fp_fusion=True, **shapes,
        )  # fmt: skip
    return states, final


class OutputGate(NamedTuple):
    """The output stage `mamba3_gate` applies, handed to the forward to fuse: z (T, H, P),
    any token stride; mimo_z, mimo_o (H, R, P) (both or neither); the pre-gate norm's weight
    (H, P) or None, and its eps."""

    z: Tensor
    mimo_z: Tensor | None
    mimo_o: Tensor | None
    norm_w: Tensor | None
    eps: float


# the fused output stage needs a program's whole rows (the pre-gate norm, the rank sum): at
# headdim 64 the chunk-output programs hold them anyway (BP = 64)
MAX_GATED_HEADDIM = 64


def scan_forward(q, k, v, mx, a, s, g, d, init, table: ChunkTable, gate: OutputGate | None = None):
    """y (T, R, H, P) in v's dtype, the final states (n_seq, H, P, N) fp32 and the chunks'
    start states (n_chunks, H, P, N) in the input dtype (kept for the backward). v is
    (T, R, H, P), or with mx (H, R, P) the MIMO x (T, H, P); d (H,) fp32 or None. With
    `gate` (headdim <= MAX_GATED_HEADDIM; inference: nothing keeps y) the first output is the
    gated o (T, H, P) instead, as `mamba3_gate` would give it: one kernel and one (T, R, H, P)
    round trip fewer."""
    tokens, rank, heads, d_state = q.shape
    headdim = v.shape[-1]
    chunk_rows = table.chunk_tokens * rank
    states, final = _state_pass(v, mx, k, a, s, init, table, rank, chunk_rows, reverse=False)
    if gate is not None and headdim > MAX_GATED_HEADDIM:
        raise ValueError(f"a fused output gate needs headdim <= {MAX_GATED_HEADDIM}, not {headdim}")
    shape = (tokens, heads, headdim) if gate is not None else (tokens, rank, heads, headdim)
    y = _new_output(shape, v)
    bp = min(headdim, 64)
    # MIMO chunks hold fewer tokens: one pass over N = 128 was faster there (H100, 8 × 2048,
    # R=4: 0.81 against 0.91 ms); SISO was not (0.24 against 0.23 ms), nor was the backward
    bn = min(d_state, 128 if rank > 1 else 64)
    grid = (table.n_chunks, heads, headdim // bp)
    z, mz, mo, w, eps = gate if gate is not None else (a, None, None, None, 0.0)
    _chunk_output_kernel[grid](
        q, k, v, pointer_or(mx, a), a, s, g, pointer_or(d, a), states, y, table.tok0,
        table.ntok, z, pointer_or(mz, a), pointer_or(mo, a), pointer_or(w, a), heads,
        v.stride(0), z.stride(0), eps, N=d_state, P=headdim, R=rank, BT=chunk_rows, BN=bn,
        BP=bp, HAS_MX=mx is not None, HAS_D=d is not None, GATE=gate is not None,
        GATE_MIMO=mz is not None, HAS_NORM=w is not None, PRECISION=dot_precision(q.dtype),
        enable_fp_fusion=True,
    )  # fmt: skip
    return y, final, states


def scan_backward(q, k, v, mx, a, s, g, d, states, dy, dfinal, table: ChunkTable, grads=None):
    """Gradients of the core from the forward's chunk states: dq, dk, dv (input dtypes; with
    mx, dx (T, H, P); with `grads`, v's gradient is written into its piece "x"), d mimo_x
    (fp32, or None), per-row dA, ds, dγ (fp32), dD (fp32, or None) and dinit."""
    rank, heads, d_state, headdim = q.shape[1], q.shape[2], q.shape[3], v.shape[-1]
    chunk_rows = table.chunk_tokens * rank
    dstates, dinit = _state_pass(dy, None, q, a, s, dfinal, table, rank, chunk_rows, True)
    rows = v if mx is None else mimo_values(v, mx)  # (T, R, H, P), any token stride
    dq, dk = (_new_output(t.shape, t) for t in (q, k))  # contiguous
    # SISO's dv is dx (into in_proj's gradient with `grads`); MIMO's is reduced to it below
    dv = gradient_output(grads, "x", v.shape, v) if mx is None else _new_output(rows.shape, rows)
    per_row = _new_output((3, *q.shape[:3]), q, torch.float32)
    dd = _new_output((table.n_chunks, heads), q, torch.float32) if d is not None else None
    _chunk_grad_kernel[(table.n_chunks, heads)](
        q, k, rows, dy, a, s, g, pointer_or(d, a), states, dstates, dq, dk, dv, per_row[0],
        per_row[1], per_row[2], pointer_or(dd, a), table.tok0, table.ntok, heads,
        rows.stride(0), dv.stride(0) // rank, N=d_state, P=headdim, R=rank, BT=chunk_rows,
        BN=min(d_state, GRAD_BLOCK_N), HAS_D=d is not None, PRECISION=dot_precision(q.dtype),
        enable_fp_fusion=True,
    )  # fmt: skip
    dd = dd.sum(0) if dd is not None else None
    if mx is None:
        return dq, dk, dv, None, per_row, dd, dinit
    dx = gradient_output(grads, "x", v.shape, v)
    dmx = mimo_values_grad(v, mx, dv, dx)
    return dq, dk, dx, dmx, per_row, dd, dinit


class Mamba3CoreFunction(torch.autograd.Function):
    """y, G_T = core(q, k, v, a, s, γ, D, G_0): the kernels above with a Triton backward.

    The chunks' start states are kept for the backward (a tensor of q's size at headdim 64)
    rather than recomputed: one state pass fewer per training step."""

    @staticmethod
    def forward(ctx, q, k, v, mx, a, s, g, d, init, table, grads):
        ctx.set_materialize_grads(False)  # training leaves G_T unused: no zeros, no work
        y, final, states = scan_forward(q, k, v, mx, a, s, g, d, init, table)
        ctx.save_for_backward(q, k, v, mx, a, s, g, d, init, states, final)
        ctx.table, ctx.grads = table, grads
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        q, k, v, mx, a, s, g, d, init, states, final = ctx.saved_tensors
        table = ctx.table
        dy = (
            dy.contiguous()
            if dy is not None
            else torch.zeros((*q.shape[:3], v.shape[-1]), device=v.device, dtype=v.dtype)
        )
        dfinal = dfinal.contiguous() if dfinal is not None else None
        dq, dk, dv, dmx, per_row, dd, dinit = scan_backward(
            q, k, v, mx, a, s, g, d, states, dy, dfinal, table, ctx.grads
        )
        # (T, H) each: the ranks of a token summed
        da_rows, ds, dg = per_row[:, :, 0] if per_row.shape[2] == 1 else per_row.sum(dim=2)
        if dfinal is not None:
            da_rows[table.seq_ends] += (dfinal * final).sum(dim=(-2, -1))
        # (T, H): 8-14 us chunk-parallel, against 10-66 us for a serial walk (H100, H=32)
        da = chunked_cumsum(da_rows, table, reverse=True)
        dinit = dinit if init is not None else None
        return dq, dk, dv, dmx, da, ds, dg, dd, dinit, None, None


def _core_inputs(q, k, v, a, s, g, init, mimo_x, d) -> tuple:
    """The core's tensors as its kernels index them."""
    return (
        q.contiguous(), k.contiguous(), token_major(v),
        mimo_x.contiguous() if mimo_x is not None else None, a.contiguous(), s.contiguous(),
        g.contiguous(), d.contiguous() if d is not None else None,
        init.contiguous() if init is not None else None,
    )  # fmt: skip


def mamba3_core_gated(q, k, v, a, s, g, init, table: ChunkTable, mimo_x, d, gate: OutputGate):
    """Not differentiable (a prefill): `mamba3_gate(mamba3_core(...))` with the gate fused
    into the core's output kernel. Returns o (T, H, P) and G_T (n_seq, H, P, N)."""
    z, mimo_z, mimo_o, norm_w, eps = gate
    weights = (w.contiguous() if w is not None else None for w in (mimo_z, mimo_o, norm_w))
    gate = OutputGate(token_major(z), *weights, eps)
    o, final, _ = scan_forward(*_core_inputs(q, k, v, a, s, g, init, mimo_x, d), table, gate)
    return o, final


def mamba3_core(q, k, v, a, s, g, init, table: ChunkTable, mimo_x=None, d=None, grads=None):
    """Differentiable core. q, k: (T, R, H, N); v: (T, R, H, P), or with `mimo_x` (H, R, P)
    the MIMO x (T, H, P) whose rows x̃_r = mimo_x[:, r] ⊙ x the kernels form (any token
    stride); a, s, g: (T, H) fp32; init: (n_seq, H, P, N) fp32 or None; d: the D skip (H,)
    or None; `table` cuts the tokens into the scan's chunks; with `grads` (v is its piece
    "x") v's gradient is written into that buffer. Returns y (T, R, H, P) (with D·x̃_r) and
    G_T (n_seq, H, P, N)."""
    return Mamba3CoreFunction.apply(*_core_inputs(q, k, v, a, s, g, init, mimo_x, d), table, grads)
