"""A prompt's keys and values into the static KV cache, in one Triton kernel.

A prefill that fills a cache ran, per attention layer, RoPE of q and of k (a kernel each),
a copy of k and one of v into the cache and the advance of the device positions: five
kernels, where a graphed batch-1 prefill of 512 tokens into a cache took a `*-` × 8 model
52 µs (15%) longer than the same forward without one (H100). Here one launch rotates q and
k at positions offset, offset + 1, ... (the rotate-half convention and arithmetic of
`rope.py`, so the results are the same bits), writes k and v at those positions of the cache
and sets the device positions to offset + T; the rotated k also goes out contiguous, for
the prefill's own attention (406 -> 324 µs for that prefill, below the cacheless forward's
354: its two RoPE kernels are gone too). Without RoPE, q and k are returned as they came.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.devices import on_input_device
from hybrid.kernels.launch_args import even_head_dim, heads_contiguous

BLOCK_TOKENS = 16


@triton.jit
def _rows(ptr, b, t, h, SB, ST, mask, HALF: tl.constexpr, HP: tl.constexpr):
    """The two halves of head h's rows for tokens t of sequence b, float32, from a tensor
    of batch and token strides SB, ST and D = 2·HALF contiguous values a head."""
    j = tl.arange(0, HP)
    src = ptr + b * SB + (t * ST + h * (2 * HALF))[:, None] + j[None, :]
    return (tl.load(src, mask=mask, other=0.0).to(tl.float32),
            tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32))  # fmt: skip


@triton.jit
def _store_halves(ptr, offs, first, second, mask, HALF: tl.constexpr):
    tl.store(ptr + offs, first.to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + offs + HALF, second.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prompt_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, seqlens_ptr, inv_ptr,
    T, offset, SQB, SQT, SKB, SKT, SVB, SVT, SCB, SCH, SCS,
    H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr,
    BT: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Program (sequence b and token block, head slot): slots below H rotate q's head into
    q_out (Bt, T, H, D) (H is 0 without ROPE); slot H + g rotates k's head g into k_out (Bt,
    T, KV, D) and the cache, and copies v's head g into the cache (strides SCB, SCH, SCS).
    The first program of each sequence sets its device position."""
    blocks = tl.cdiv(T, BT)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    block = tl.program_id(0) % blocks
    slot = tl.program_id(1)
    t = (block * BT + tl.arange(0, BT)).to(tl.int64)
    j = tl.arange(0, HP)
    mask = (t < T)[:, None] & (j < HALF)[None, :]
    g = slot - H  # the KV head of a slot past q's
    if ROPE:
        angle = (offset + t).to(tl.float32)[:, None] * tl.load(
            inv_ptr + j, mask=j < HALF, other=0.0
        )[None, :]
        cos, sin = tl.cos(angle), tl.sin(angle)
        if g < 0:
            x1, x2 = _rows(q_ptr, b, t, slot, SQB, SQT, mask, HALF, HP)
            out = ((b * T + t) * H + slot)[:, None] * (2 * HALF) + j[None, :]
            _store_halves(q_out_ptr, out, x1 * cos - x2 * sin, x2 * cos + x1 * sin, mask, HALF)
    if g >= 0:
        k1, k2 = _rows(k_ptr, b, t, g, SKB, SKT, mask, HALF, HP)
        if ROPE:
            k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
            out = ((b * T + t) * KV + g)[:, None] * (2 * HALF) + j[None, :]
            _store_halves(k_out_ptr, out, k1, k2, mask, HALF)
        cached = b * SCB + g * SCH + ((offset + t) * SCS)[:, None] + j[None, :]
        _store_halves(k_cache_ptr, cached, k1, k2, mask, HALF)
        v1, v2 = _rows(v_ptr, b, t, g, SVB, SVT, mask, HALF, HP)
        _store_halves(v_cache_ptr, cached, v1, v2, mask, HALF)
    if (block == 0) & (slot == 0):
        tl.store(seqlens_ptr + b, (offset + T).to(tl.int32))


@on_input_device
def append_prompt(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    offset: int,
    inv_freq: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """q (Bt, T, H, D), k and v (Bt, T, H_kv, D) (slices of the qkv projection), written at
    positions offset.. of the cache k_cache, v_cache (Bt, H_kv, capacity, D), rotated by
    `inv_freq` (RoPE; None: NoPE); seqlens (Bt,) int32 set to offset + T. Returns the rotated
    q and k, contiguous (with NoPE, q and k themselves). No autograd. D must be even: a head
    moves as two halves."""
    even_head_dim("append_prompt", q.shape[-1])
    q, k, v = (heads_contiguous(t) for t in (q, k, v))
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    rope = inv_freq is not None
    q_out, k_out = (torch.empty_like(t, memory_format=torch.contiguous_format) if rope else t
                    for t in (q, k))  # fmt: skip
    half = head_dim // 2
    grid = (batch * triton.cdiv(length, BLOCK_TOKENS), (heads if rope else 0) + kv_heads)
    _prompt_kernel[grid](
        q, k, v, q_out, k_out, k_cache, v_cache, seqlens, inv_freq if rope else seqlens,
        length, offset, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=heads if rope else 0, KV=kv_heads, HALF=half, HP=triton.next_power_of_2(half),
        BT=BLOCK_TOKENS, ROPE=rope, enable_fp_fusion=True,
    )  # fmt: skip
    return q_out, k_out
