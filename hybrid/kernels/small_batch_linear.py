"""y = x·Wᵀ for one or two input rows (a batch-1 or -2 decode step), as a Triton
matrix-vector kernel.

At batch 1 every projection of a decode step (Mamba-3's in_proj and out_proj, attention's qkv
and output, SwiGLU's two, the head) is a matrix-vector product, and cuBLAS took 3.2-4.8 us for
each of a d_model-512 model's (0.26-3.2 MB of weights, 3-30% of copy bandwidth on an H100):
the largest share of the decode step the latency objective times. Here a program reads BN
whole weight rows, in BK-wide 16-byte-vector steps, against the input row; with BN = 4 a 512-
wide output is already 128 programs, so even the smallest projection covers the SMs, and
wider outputs take 16 rows a program; SwiGLU's output projection forms silu(gate) * up from
its input row itself (`swiglu_linear`). On an H100 that is 1.25-1.72x cuBLAS at d_model 512
(1.59-1.85x against the product kernel + cuBLAS for SwiGLU's) and 1.06-1.33x at 2048, and
the batch-1 decode step of 31M models 19-21% shorter (BENCHMARKS.md, "Small-batch linear").
Two rows pay where both share what a program loads (`two_rows_pay`); with the step's kernels
chained (hybrid/kernels/dependent_launch.py) that took the batch-2 step 27-30% shorter, and
4-row tiles holding their whole weight row across the PDL wait (`_preloaded_columns`, up to
2,048 columns: out_proj and SwiGLU's output projection had loaded all but their first 512
after it) a further 10-14% at batch 2 and 3-5% at batch 1. A
block's residual add and RMSNorm fold into the projection that follows them
(`add_rms_norm_linear`: one kernel a block fewer) where the row is read in one step by 4-row
tiles (`fold_pays`), which took the batch-1 step of 31M models 6-13% shorter; the first
block's also gathers its rows from the embedding table (`embed_rms_norm_linear`: no
embedding kernel, 1.2-1.7% of that step). More rows,
autograd, autocast and the CPU stay on `F.linear`. So do eager calls: the kernel is
taken while a CUDA graph is being captured (the latency objective, graphed generation), where
only device time is replayed.
Eagerly a batch-1 step is bound by the host, and Triton's launcher costs more of it than
cuBLAS's (54 against 20 us a call on the H100 host).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hybrid.devices import autocast_dtype, on_input_device
from hybrid.kernels.dependent_launch import MAX_ROWS, chained, wait_for_predecessor
from hybrid.kernels.launch_args import pointer_or
from hybrid.kernels.norms import add_rms_norm, swiglu

MAX_BK = 512  # weight columns a program reads per step
MAX_PRELOAD_K = 2048  # weight columns a chained 4-row tile may hold across its PDL wait
TWO_ROW_BYTES = 4 << 20
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# HYBRID_SMALL_BATCH_LINEAR=0 keeps every call on F.linear (the benchmark's A/B switch)
ENABLED = os.environ.get("HYBRID_SMALL_BATCH_LINEAR", "1") != "0"
# HYBRID_FOLD_NORMS=0 keeps the blocks' norms as kernels of their own (`add_rms_norm_linear`)
FOLD_NORMS = os.environ.get("HYBRID_FOLD_NORMS", "1") != "0"


@triton.jit
def _residual(x_ptr, d_ptr, ks, kmask, HAS_DELTA: tl.constexpr):
    """x + δ over ks, rounded to x's dtype as the residual stream stores it."""
    x = tl.load(x_ptr + ks, mask=kmask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(d_ptr + ks, mask=kmask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _partial(x_ptr, d_ptr, nw_ptr, res_ptr, w, ks, kmask, K, stored, GATED: tl.constexpr,
             NORMED: tl.constexpr, HAS_DELTA: tl.constexpr, STORES: tl.constexpr):  # fmt: skip
    """One BK step of the input row x_ptr against the BN rows in w: their sums and, NORMED,
    the row's squares. GATED: the input row is SwiGLU's [gate | up] (2K wide) and enters as
    silu(gate) ⊙ up, rounded to the row's dtype as the separate product kernel stores it.
    NORMED: it is r = x + δ (δ where HAS_DELTA; with STORES, columns below `stored` are
    written to res_ptr) and enters as r·nw, whose sums the caller scales by 1/rms(r)."""
    if NORMED:
        r = _residual(x_ptr, d_ptr, ks, kmask, HAS_DELTA)
        if STORES:
            tl.store(res_ptr + ks, r, mask=ks < stored)
        r = r.to(tl.float32)
        x = r * tl.load(nw_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        squares = tl.sum(r * r, 0)
    else:
        x = tl.load(x_ptr + ks, mask=kmask, other=0.0)
        squares = 0.0
    if GATED:
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + K + ks, mask=kmask, other=0.0).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * up).to(x.dtype)
    return tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1), squares


@triton.jit
def _gemv_kernel(x_ptr, d_ptr, res_ptr, nw_ptr, w_ptr, y_ptr, tok_ptr, K, N, SX, SD, SR, SY,
                 eps, ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GATED: tl.constexpr, NORMED: tl.constexpr, HAS_DELTA: tl.constexpr,
                 GATHER: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr):  # fmt: skip
    """Program: BN output features of every input row; float32 sums over K in BK-wide steps.
    NORMED: the rows are the residual stream x (+ δ, the last block's output, HAS_DELTA),
    normalised by RMSNorm with weight nw: since 1/rms is one scalar a row, the sums of r·nw
    and of r² are taken in the same pass and the sums scaled at the end (no pass over the
    row before the product); program 0 stores r = x + δ at res_ptr. GATHER: row m is row
    tok[m] of the table x_ptr (row stride SX), the first block's embedding, which program 0
    stores at res_ptr as the residual stream. PRELOAD: the first step's weights are loaded
    before waiting for the kernel that wrote x (PDL), and shared by the rows."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < N
    rows = cols.to(tl.int64)[:, None] * K
    ks = tl.arange(0, BK)
    stored = tl.where(tl.program_id(0) == 0, K, 0)  # residual columns this program stores
    if PRELOAD:
        first = tl.load(w_ptr + rows + ks[None, :], mask=cmask[:, None] & (ks < K)[None, :],
                        other=0.0)  # fmt: skip
    wait_for_predecessor(PDL)
    for m in tl.static_range(ROWS):
        x_row, d_row, res_row = x_ptr + m * SX, d_ptr + m * SD, res_ptr + m * SR
        if GATHER:
            x_row = x_ptr + tl.load(tok_ptr + m).to(tl.int64) * SX
        if PRELOAD:
            acc, squares = _partial(x_row, d_row, nw_ptr, res_row, first, ks, ks < K, K, stored,
                                    GATED, NORMED, HAS_DELTA, HAS_DELTA or GATHER)  # fmt: skip
        else:
            acc, squares = tl.zeros([BN], tl.float32), 0.0
        for k0 in range(BK if PRELOAD else 0, K, BK):
            kk = k0 + ks
            kmask = kk < K
            w = tl.load(w_ptr + rows + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                        other=0.0)  # fmt: skip
            sums, step_squares = _partial(x_row, d_row, nw_ptr, res_row, w, kk, kmask, K,
                                          stored, GATED, NORMED, HAS_DELTA,
                                          HAS_DELTA or GATHER)  # fmt: skip
            acc += sums
            if NORMED:
                squares += step_squares
        if NORMED:
            acc *= tl.rsqrt(squares / K + eps)
        tl.store(y_ptr + m * SY + cols, acc.to(y_ptr.dtype.element_ty), mask=cmask)


def tiling(features: int, k: int) -> tuple[int, int]:
    """(BN, BK) from an H100 sweep of BN 4/8/16 × BK 256/512 with the weights out of L2: BN
    4 won every output up to 3,152 features, 16 the 8,800-wide in_proj at d_model 2048 (14.1
    against 16.0 us with 8)."""
    return (4 if features <= 4096 else 16), min(MAX_BK, triton.next_power_of_2(k))


def two_rows_pay(weight: Tensor) -> bool:
    """Where two rows beat cuBLAS (H100, chained, weights in or out of L2): rows read in one
    step, whose weights both rows share (d_model 512: 1.31-2.08x, the 50,257-wide head 1.23x),
    or weights up to 4 MB (out_proj at d_model 1024, 2,048 wide: 1.05-1.10x); wider rows of
    more bytes are read once a row and lost (d_model 1024's in_proj 0.86x, 2048's 0.62-0.90x)."""
    return weight.shape[1] <= MAX_BK or weight.numel() * weight.element_size() <= TWO_ROW_BYTES


def takes(x: Tensor, weight: Tensor) -> bool:
    """Whether `small_batch_linear` runs the kernel: one row (two where `two_rows_pay`) on
    CUDA inside a CUDA-graph capture, nothing to differentiate, no autocast, one floating
    dtype, a contiguous weight and input rows."""
    return _takes_rows(x.numel() // max(x.shape[-1], 1), x, weight)


def _takes_rows(rows: int, x: Tensor, weight: Tensor) -> bool:
    """`takes` for `rows` input rows of x's device, dtype and column stride (x may be the
    table they are gathered from)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (
        ENABLED
        and x.is_cuda
        and torch.cuda.is_current_stream_capturing()
        and 0 < rows <= (MAX_ROWS if two_rows_pay(weight) else 1)  # the chained batches
        and not grad
        and not torch.is_autocast_enabled(x.device.type)
        and x.dtype == weight.dtype
        and x.dtype in DTYPES
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.stride(-1) == 1
    )


def planned_backend(device: torch.device) -> str:
    """What the projections run on `device`, prefill / decode (the latency records' entry)."""
    if device.type != "cuda":
        return f"F.linear (device is {device.type})"
    if not ENABLED:
        return "cublas prefill / cublas decode (HYBRID_SMALL_BATCH_LINEAR=0)"
    norms = (
        "block norms and the embedding folded in up to 512 inputs"
        if FOLD_NORMS
        else "HYBRID_FOLD_NORMS=0"
    )
    return (
        f"cublas prefill / gemv decode (Triton matrix-vector kernel at batch 1-2 in CUDA graphs; "
        f"{norms})"
    )


def _loads_early(chained_launch: bool, bn: int) -> bool:
    """Whether the first weight step (`_preloaded_columns`: the whole row where it can) is
    loaded before the PDL wait (PRELOAD): for chained 4-row tiles only. A 16-row tile held
    across the wait took the kernel from 96 to 122 registers; unchained, the first step
    stays in the loop (peeled out of it, the gated kernel lost 9-16%). The interpreter
    check also runs that path unchained."""
    return chained_launch and bn == 4


def _preloaded_columns(k: int, bk: int) -> int:
    """BK of a tile loaded before the PDL wait: the whole row where it has at most
    MAX_PRELOAD_K columns, so that no weight is left to load after the wait. H100, the
    latency objective's decode step, first 512 columns -> whole row: batch 1 0.953-0.969x,
    batch 2 0.860-0.899x at d_model 512, 0.936-0.950x at 1024 (BENCHMARKS.md, "Chained
    decode kernels"). Offline ptxas (Triton 3.6): 109-128 registers at one row, 207-242 at
    two, no spill, at 2,048 columns; 4,096 spill at two rows."""
    return max(bk, triton.next_power_of_2(k)) if k <= MAX_PRELOAD_K else bk


def _new_output(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The kernel's output buffer (the interpreter check poisons it with NaN)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _rows(t: Tensor) -> Tensor:
    """t as (rows, last dim) with unit column stride (a view where it can be)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(rows: Tensor, weight: Tensor, *, gated: bool = False, delta: Tensor | None = None,
            residual: Tensor | None = None, norm_weight: Tensor | None = None,
            eps: float = 0.0, tokens: Tensor | None = None) -> Tensor:  # fmt: skip
    """The kernel over input rows (M, K) -> (M, N); with norm_weight the rows are normalised
    first (`_gemv_kernel`'s NORMED) and x + δ is stored in residual. With tokens (M,) the
    rows are those rows of the table `rows` (GATHER)."""
    weight = weight.contiguous()  # the kernel reads rows of K (no copy where they are)
    n, k = weight.shape
    m = rows.shape[0] if tokens is None else tokens.numel()
    out = _new_output((m, n), rows)
    bn, bk = tiling(n, k)
    pdl = chained(rows, m)
    preload = _loads_early(pdl, bn)
    if preload:
        bk = _preloaded_columns(k, bk)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        rows, pointer_or(delta, rows), pointer_or(residual, rows), pointer_or(norm_weight, rows),
        weight, out, pointer_or(tokens, rows), k, n, rows.stride(0),
        0 if delta is None else delta.stride(0), 0 if residual is None else residual.stride(0),
        out.stride(0), eps, ROWS=m, BN=bn, BK=bk, GATED=gated, NORMED=norm_weight is not None,
        HAS_DELTA=delta is not None, GATHER=tokens is not None, PDL=pdl,
        PRELOAD=preload, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    return out


@on_input_device
def gemv(x: Tensor, weight: Tensor, gated: bool = False) -> Tensor:
    """x (..., K) · weight (N, K)ᵀ -> (..., N) by the kernel, whatever the row count (the
    CPU tests run it under TRITON_INTERPRET=1); `gated`: x is (..., 2K) [gate | up] and
    silu(gate) ⊙ up is multiplied instead."""
    return _launch(_rows(x), weight, gated=gated).reshape(*x.shape[:-1], weight.shape[0])


@on_input_device
def normed_gemv(
    x: Tensor, delta: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """(r, RMSNorm(r)·norm_weight · weightᵀ) for r = x + δ (x itself where δ is None) by the
    kernel, whatever the row count: a block's pre-norm folded into its layer's first
    projection. r is rounded to x's dtype, as `add_rms_norm` stores it; the normalised row
    stays float32 (`add_rms_norm` rounds it to the dtype before the projection reads it)."""
    rows = _rows(x)
    deltas = None if delta is None else _rows(delta)
    residual = None if delta is None else _new_output(rows.shape, rows)
    out = _launch(rows, weight, delta=deltas, residual=residual,
                  norm_weight=norm_weight.contiguous(), eps=eps)  # fmt: skip
    summed = x if residual is None else residual.reshape(x.shape)
    return summed, out.reshape(*x.shape[:-1], weight.shape[0])


@on_input_device
def embedding_normed_gemv(
    table: Tensor, tokens: Tensor, norm_weight: Tensor, eps: float, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """`normed_gemv` of the embedding rows table[tokens] (tokens (...,)), gathered by the
    kernel: (x (..., K), RMSNorm(x)·norm_weight · weightᵀ (..., N)), x written by the kernel
    as the residual stream that the next block adds to. The ids are not range-checked (a
    check would sync the host inside a graph): they come from the model's own sampling or
    from a prompt that the eager prefill's `F.embedding` has checked."""
    flat = tokens.reshape(-1)
    residual = _new_output((flat.numel(), table.shape[1]), table)
    out = _launch(table, weight, residual=residual, norm_weight=norm_weight.contiguous(),
                  eps=eps, tokens=flat)  # fmt: skip
    return (
        residual.reshape(*tokens.shape, table.shape[1]),
        out.reshape(*tokens.shape, weight.shape[0]),
    )


def small_batch_linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` (no bias), by the kernel where `takes` says so."""
    return gemv(x, weight) if takes(x, weight) else F.linear(x, weight)


def swiglu_linear(h: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(swiglu(h), weight)` for SwiGLU's fused [gate | up] projection h; where `takes`
    says so, in one kernel: at batch 1 the separate product was a launch of its own (~1.5 us
    of a ~190 us step, once per SwiGLU)."""
    if takes(h, weight) and h.shape[-1] == 2 * weight.shape[1]:
        return gemv(h, weight, gated=True)
    return F.linear(swiglu(h), weight)


def fold_pays(weight: Tensor) -> bool:
    """Where the norm folded into the projection beat the norm kernel + projection (H100,
    chained): rows read in one step (K ≤ 512) into 4-row tiles (≤ 4,096 outputs), one row
    0.63-0.95x, two rows 0.63-0.96x with the weights out of L2 (a 31M model's 62 MB are)
    and 0.79-1.12x in it. Elsewhere it did not pay: the 50,257-wide head 0.99-1.03x at one
    row and 1.07-1.16x at two, the in-projections at d_model 1024 and 2048 0.97-1.32x at one
    row (losing wherever the weights sat in L2) and up to 1.49x at two, a d_model-2048
    hybrid's step 1.04-1.09x. There the norm's loads and its cross-warp sum are not hidden
    behind weights loaded before the PDL wait, and a 16-row tile went from 96 to 126
    registers (4 programs an SM instead of 5)."""
    n, k = weight.shape
    return k <= MAX_BK and tiling(n, k)[0] == 4


def _folds(x: Tensor, delta: Tensor | None, norm_weight: Tensor | None, weight: Tensor) -> bool:
    """Whether `add_rms_norm_linear` takes `normed_gemv`: where `takes` says so for the
    normalised rows and `fold_pays`, δ shaped and typed as x, and a weight for the norm."""
    return (
        _norm_folds(norm_weight, x.shape[-1], weight)
        and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype))
        and takes(x, weight)
    )


def _norm_folds(norm_weight: Tensor | None, width: int, weight: Tensor) -> bool:
    """The fold's conditions on the norm and the projection: folding on, `fold_pays`, and a
    norm weight as wide as the rows."""
    return (
        FOLD_NORMS
        and fold_pays(weight)
        and norm_weight is not None
        and norm_weight.shape == (width,)
    )


def add_rms_norm_linear(
    x: Tensor, delta: Tensor | None, norm_weight: Tensor | None, eps: float, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """A pre-norm block's entry: (r, F.linear(RMSNorm(r)·norm_weight, weight)) for r = x + δ
    (x where δ is None), as `add_rms_norm` then `small_batch_linear` compute them; where
    `takes` and `fold_pays` say so, in one kernel (`normed_gemv`), which saves the norm's
    kernel (a chained one cost 0.3-0.8 us of a ~128 us batch-1 step, once per block)."""
    if _folds(x, delta, norm_weight, weight):
        return normed_gemv(x, delta, norm_weight, eps, weight)
    summed, normed = add_rms_norm(x, delta, norm_weight, eps, autocast_dtype(x))
    return summed, small_batch_linear(normed, weight)


def embed_rms_norm_linear(
    table: Tensor, tokens: Tensor, norm_weight: Tensor | None, eps: float, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """The first block's entry in a decode step: (x, F.linear(RMSNorm(x)·norm_weight, weight))
    for the embedding rows x = table[tokens], as `F.embedding` then `add_rms_norm_linear`
    compute them; where the fold is taken, in one kernel (`embedding_normed_gemv`), which
    saves the embedding's kernel."""
    if (
        _norm_folds(norm_weight, table.shape[1], weight)
        and not tokens.is_floating_point()
        and _takes_rows(tokens.numel(), table, weight)
    ):
        return embedding_normed_gemv(table, tokens, norm_weight, eps, weight)
    return add_rms_norm_linear(F.embedding(tokens, table), None, norm_weight, eps, weight)
