"""Decode attention in Triton: one query token per sequence against a static KV cache.

`append_token` takes the new token into the cache: RoPE of its q and k at each sequence's
position `seqlens`, k and v written there, `seqlens` advanced, all in one kernel.
`split_kv_decode` ("flash-decoding") then attends over the cache.

SDPA and flash-attn-4 on Hopper walk the whole context with one CTA per (sequence, KV head):
at batch 1 with 2 KV heads that is 2 of an H100's 132 SMs, and cuDNN SDPA took 67 µs per
layer to read a 2 MB cache at context 4,096, a fiftieth of what the card can stream. Here the
context is cut into splits, walked by separate programs; each program serves every query head
of one KV head (GQA: the cache is read once per group), keeps a running max and sum (online
softmax) and, when there are several splits, stores an unnormalised partial that a second
kernel combines. The split count depends on the batch, the heads and the cache's capacity,
never on the filled lengths (`seqlens`, read on the device), so one launch is valid at every
position of a CUDA graph; a split beyond a sequence's length stores an empty partial.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.devices import multiprocessors, on_input_device
from hybrid.kernels.dependent_launch import chained, wait_for_predecessor
from hybrid.kernels.launch_args import even_head_dim, pointer_or, token_major
from hybrid.kernels.triton_math import dot_precision

BLOCK_KEYS = 64  # keys a program loads at a time
MIN_SPLIT_KEYS = 64  # a split is at least this many keys (one BLOCK_KEYS load)
MAX_SPLITS = 128
PROGRAMS_PER_SM = 2  # splits are added until the grid covers the SMs this many times
# one split (no combine kernel) where the batch alone covers the SMs this many times (from,
# to), counting batch × KV heads × head dim / 64 (a program of D 128 counts twice)
ONE_SPLIT_COVER = (1.5, 4.5)
LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, out_ptr, part_ptr, stats_ptr,
    KV, split_keys, scale, SQB, SQH, SKB, SKH, SKS, SVB, SVH, SVS,
    G: tl.constexpr, GB: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    SPLITS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (sequence·KV head, split): the G query heads of one KV head against keys
    [split·split_keys, min((split+1)·split_keys, seqlen)). With one split it writes the
    output; else the partial Σ p·v (fp32) and the (max, sum) of its scores in log2 units."""
    wait_for_predecessor(PDL)
    bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bk // KV).to(tl.int64)
    kvh = bk % KV
    start = split * split_keys
    end = tl.minimum(start + split_keys, tl.load(seqlens_ptr + b))
    rows = tl.arange(0, GB)
    heads = kvh * G + rows
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * SQB + heads[:, None] * SQH + d[None, :],
                mask=(rows < G)[:, None], other=0.0)  # fmt: skip
    k_rows = k_ptr + b * SKB + kvh * SKH
    v_rows = v_ptr + b * SVB + kvh * SVH
    top = tl.full((GB,), float("-inf"), tl.float32)
    total = tl.zeros((GB,), tl.float32)
    acc = tl.zeros((GB, D), tl.float32)
    for n0 in tl.range(start, end, BN):
        keys = n0 + tl.arange(0, BN)
        valid = keys < end
        k = tl.load(k_rows + keys[:, None] * SKS + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_rows + keys[:, None] * SVS + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)
        s = tl.where(valid[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, 1))  # finite: every block holds a valid key
        p = tl.exp2(s - new_top[:, None])
        rescale = tl.exp2(top - new_top)
        total = total * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        top = new_top
    out_rows = (b * KV * G + heads).to(tl.int64)
    if SPLITS == 1:
        out = acc / total[:, None]
        tl.store(out_ptr + out_rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows < G)[:, None])  # fmt: skip
    else:
        slot = out_rows * SPLITS + split
        tl.store(part_ptr + slot[:, None] * D + d[None, :], acc, mask=(rows < G)[:, None])
        tl.store(stats_ptr + slot * 2, top, mask=rows < G)
        tl.store(stats_ptr + slot * 2 + 1, total, mask=rows < G)


@triton.jit
def _combine_kernel(
    part_ptr, stats_ptr, out_ptr, SPLITS: tl.constexpr, SB: tl.constexpr, D: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Program (sequence·head): the splits' partials weighted by 2^(max − overall max);
    empty splits (max −inf) weigh 0."""
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SB)
    d = tl.arange(0, D)
    slot = row * SPLITS + s
    top = tl.load(stats_ptr + slot * 2, mask=s < SPLITS, other=float("-inf"))
    total = tl.load(stats_ptr + slot * 2 + 1, mask=s < SPLITS, other=0.0)
    best = tl.max(top, 0)
    weight = tl.where(top > float("-inf"), tl.exp2(top - best), 0.0)
    acc = tl.load(part_ptr + slot[:, None] * D + d[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _append_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, seqlens_ptr, inv_ptr,
    SQB, SKB, SVB, SCB, SCH, SCS,
    H: tl.constexpr, KV: tl.constexpr, HB: tl.constexpr, KB: tl.constexpr,
    HALF: tl.constexpr, HP: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program b: the new token's q and k rotated (rotate-half RoPE) at position seqlens[b],
    k and v written there in the cache (strides SCB, SCH, SCS), the rotated q stored
    contiguous (Bt, 1, H, D), then seqlens[b] advanced. q, k, v rows are D contiguous values a
    head, batch strides SQB, SKB, SVB (slices of the qkv projection)."""
    wait_for_predecessor(PDL)
    b = tl.program_id(0).to(tl.int64)
    pos = tl.load(seqlens_ptr + b)
    j = tl.arange(0, HP)
    cos, sin = 1.0, 0.0
    if ROPE:
        angle = pos.to(tl.float32) * tl.load(inv_ptr + j, mask=j < HALF, other=0.0)
        cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
    hq = tl.arange(0, HB)[:, None]
    hk = tl.arange(0, KB)[:, None]
    q_mask = (hq < H) & (j < HALF)[None, :]
    k_mask = (hk < KV) & (j < HALF)[None, :]
    row = q_ptr + b * SQB + hq * (2 * HALF) + j[None, :]
    q1 = tl.load(row, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(row + HALF, mask=q_mask, other=0.0).to(tl.float32)
    out = q_out_ptr + (b * H + hq) * (2 * HALF) + j[None, :]
    tl.store(out, (q1 * cos - q2 * sin).to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(out + HALF, (q2 * cos + q1 * sin).to(q_out_ptr.dtype.element_ty), mask=q_mask)
    row = k_ptr + b * SKB + hk * (2 * HALF) + j[None, :]
    k1 = tl.load(row, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(row + HALF, mask=k_mask, other=0.0).to(tl.float32)
    slot = b * SCB + hk * SCH + pos * SCS + j[None, :]
    tl.store(k_cache_ptr + slot, (k1 * cos - k2 * sin).to(k_cache_ptr.dtype.element_ty),
             mask=k_mask)  # fmt: skip
    tl.store(k_cache_ptr + slot + HALF, (k2 * cos + k1 * sin).to(k_cache_ptr.dtype.element_ty),
             mask=k_mask)  # fmt: skip
    row = v_ptr + b * SVB + hk * (2 * HALF) + j[None, :]
    v_type = v_cache_ptr.dtype.element_ty
    tl.store(v_cache_ptr + slot, tl.load(row, mask=k_mask).to(v_type), mask=k_mask)
    tl.store(v_cache_ptr + slot + HALF, tl.load(row + HALF, mask=k_mask).to(v_type), mask=k_mask)
    tl.debug_barrier()  # every warp has read seqlens[b] before it moves
    tl.store(seqlens_ptr + b, pos + 1)


def split_count(batch_kv_heads: int, capacity: int, sms: int, head_dim: int = 64) -> int:
    """Splits of the context: each split sized first, as the capacity over enough programs
    to cover the SMs PROGRAMS_PER_SM times (at least 2), rounded up to whole key blocks and
    at least MIN_SPLIT_KEYS; then as many splits as cover the capacity, at most MAX_SPLITS.
    Where the batch alone covers the SMs 1.5-4.5 times (`ONE_SPLIT_COVER`), one split: H100,
    the kernels alone, batch 16-256 × 2-8 KV heads of D 64 and 4 of D 128, contexts 2k-32k,
    every count of 1-8 (BENCHMARKS.md, "Attention", twenty-ninth session): covering 1.9-3.9
    times, one split was the fastest in all 12 cells, 0.88-0.99x two (the latency
    objective's decode step at batch 64-128, context 4k: 0.90-0.98x). Covering 7.8 times
    three splits were 0.95-0.96x two from 8k on but 1.01x at 2k-4k (a Table 7 layer: 1.013x
    its step), and from 15.5 times on two were within 1% of the best: both keep two.
    Sized first, no split lies wholly past the capacity unless MAX_SPLITS caps the count:
    counted first, with each split's size rounded up, 5 of 16 did at a capacity of 2,058 (16
    × 192 keys), and the combine reads every one. H100, bf16, graphed, µs, one layer at
    batch 1, 8/2 heads, D 64: capacity 2,058 5.37 → 4.49 (33 splits of 64 keys), 4,106 5.38
    → 4.63, 8,202 6.76 → 5.45, 32,778 9.07 → 9.07; batch 4, 4,106: 7.56 → 7.26. Where the
    batch alone fills the SMs 2 splits still beat 1 (batch 128 × 4 KV heads, 8k: 766.7 →
    707.2; × 8 KV heads, 2k: 202.5 → 189.9) and more lose (16: 735.0, 212.2). Where the cap
    leaves splits past the capacity (at 16,394 keys 42 of 128 × 192, at 32,778 25 of 128 ×
    320), counting again from the capped size (86 and 103 splits) gained nothing: the
    latency objective's batch-1 step of `*-` × 8 1.024× / 1.005× / 1.001× at 16k / 32k / 64k,
    `M-*-` × 4 1.013× / 1.005× / 0.988× (H100): a split past a sequence's length stores an
    empty partial and ends."""
    wanted = max(2, triton.cdiv(PROGRAMS_PER_SM * sms, batch_kv_heads))
    low, high = ONE_SPLIT_COVER
    if low <= batch_kv_heads * head_dim / (64 * sms) < high:
        wanted = 1
    keys = triton.cdiv(triton.cdiv(capacity, wanted), BLOCK_KEYS) * BLOCK_KEYS
    return max(1, min(triton.cdiv(capacity, max(keys, MIN_SPLIT_KEYS)), MAX_SPLITS))


def head_dim_reason(head_dim: int) -> str | None:
    """Why the kernel cannot take this head dim (its tiles are powers of two, at least the
    16 an MMA needs), or None when it can."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two in 16..256"
    return None


@on_input_device
def split_kv_decode(
    q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, splits: int | None = None
) -> Tensor:
    """Attention of q (Bt, 1, H, D) over the first seqlens[b] (≥ 1) positions of the cache
    k, v (Bt, H_kv, capacity, D), H a multiple of H_kv; returns (Bt, 1, H, D) in q's dtype.
    splits: None picks `split_count` for this device (1 where there are no SMs to fill: the
    interpreter)."""
    batch, _, heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if splits is None:
        splits = split_count(batch * kv_heads, capacity, multiprocessors(q.device), head_dim)
    split_keys = triton.cdiv(triton.cdiv(capacity, splits), BLOCK_KEYS) * BLOCK_KEYS
    out = torch.empty((batch, 1, heads, head_dim), device=q.device, dtype=q.dtype)
    pdl = chained(q, batch)
    part = stats = out  # placeholders, never touched with one split
    if splits > 1:
        part = torch.empty((batch * heads * splits, head_dim), device=q.device,
                           dtype=torch.float32)  # fmt: skip
        stats = torch.empty((batch * heads * splits, 2), device=q.device, dtype=torch.float32)
    _split_kernel[(batch * kv_heads, splits)](
        q, k, v, seqlens, out, part, stats, kv_heads, split_keys, head_dim**-0.5,
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        G=group, GB=max(16, triton.next_power_of_2(group)), D=head_dim, BN=BLOCK_KEYS,
        SPLITS=splits, PRECISION=dot_precision(q.dtype), PDL=pdl, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(batch * heads,)](
            part, stats, out, SPLITS=splits, SB=triton.next_power_of_2(splits), D=head_dim,
            PDL=pdl, num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
    return out


@on_input_device
def append_token(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    inv_freq: Tensor | None,
) -> Tensor:
    """One decode token in one kernel: q (Bt, 1, H, D) and k (Bt, 1, H_kv, D) rotated by RoPE
    (inv_freq (D/2,), None for NoPE) at each sequence's position seqlens[b], k and v (Bt, 1,
    H_kv, D) written at that position of the contiguous caches (Bt, H_kv, capacity, D), and
    seqlens advanced on the device. Returns the rotated q, contiguous. (RoPE, the cache
    writes and the length update were 6 kernels, ~9 µs of a batch-1 attention step on an
    H100.)"""
    batch, _, heads, head_dim = q.shape
    even_head_dim("append_token", head_dim)
    kv_heads = k.shape[2]
    q, k, v = token_major(q), token_major(k), token_major(v)  # qkv slices: no copy
    q_out = torch.empty((batch, 1, heads, head_dim), device=q.device, dtype=q.dtype)
    half = head_dim // 2
    pdl = chained(q, batch)
    _append_kernel[(batch,)](
        q, k, v, q_out, k_cache, v_cache, seqlens, pointer_or(inv_freq, q),
        q.stride(0), k.stride(0), v.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=heads, KV=kv_heads, HB=triton.next_power_of_2(heads),
        KB=triton.next_power_of_2(kv_heads), HALF=half, HP=triton.next_power_of_2(half),
        ROPE=inv_freq is not None, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    return q_out
