"""Run under TRITON_INTERPRET=1 (by tests/test_attention_decode.py), float32, fresh random
inputs:
- the split-KV decode kernel against softmax attention in float64: GQA groups of 1, 3 and 4
  query heads, per-sequence lengths from 1 to the cache's capacity (positions past them hold
  NaN, so a read of one shows), one split and several (some beyond a sequence's length, hence
  empty), q read as a slice of a wider projection;
- the token-append kernel (RoPE of q and k, the cache writes, the length update) against the
  PyTorch path (`rope_rotate_torch`, `KVCache.append_token`), q, k, v as slices of one qkv
  projection, RoPE and NoPE, a head dim whose half is not a power of two."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import decode_attention_reference, interpreted_verdict, rel_err

from hybrid.cache import KVCache
from hybrid.kernels.attention_decode import append_token, split_kv_decode
from hybrid.kernels.rope import inverse_frequencies
from hybrid.layers.attention import rope_rotate_torch

TOLERANCE = 1e-5
CASES = [  # head_dim, heads, kv_heads, capacity, seqlens, split counts
    (16, 4, 1, 300, [1, 300, 131], [1, 3, 7]),
    (32, 6, 2, 200, [77, 200], [1, 4]),
    (16, 2, 2, 64, [64, 5], [1, 2]),
]


def check_append(heads: int, kv_heads: int, head_dim: int, rope: bool) -> float:
    """append_token against the PyTorch path at positions 0, 17 and the last; the worst error of
    q, the caches (whole buffers: nothing else may change) and the lengths."""
    batch, capacity, theta = 3, 40, 10000.0
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    mine = KVCache.empty(batch, kv_heads, capacity, head_dim, device="cpu", dtype=torch.float32)
    mine.k.normal_(), mine.v.normal_()
    mine.seqlens.copy_(torch.tensor([0, 17, capacity - 1], dtype=torch.int32))
    expected = KVCache(mine.k.clone(), mine.v.clone(), mine.seqlens.clone())
    q_expected, k_rotated = q, k
    if rope:
        positions = expected.seqlens[:, None]
        q_expected = rope_rotate_torch(q, positions, theta)
        k_rotated = rope_rotate_torch(k, positions, theta)
    expected.append_token(k_rotated.transpose(1, 2), v.transpose(1, 2))
    inv_freq = inverse_frequencies(head_dim, theta, q.device) if rope else None
    q_mine = append_token(q, k, v, mine.k, mine.v, mine.seqlens, inv_freq)
    lengths = float(not torch.equal(mine.seqlens, expected.seqlens))
    error = max(rel_err(q_mine, q_expected), rel_err(mine.k, expected.k),
                rel_err(mine.v, expected.v), lengths)  # fmt: skip
    print(f"append H={heads}/{kv_heads} D={head_dim} rope={rope}: {error:.1e}")
    return error


def main() -> int:
    worst = max(
        check_append(4, 2, 16, True), check_append(6, 3, 24, True), check_append(2, 2, 16, False)
    )
    for head_dim, heads, kv_heads, capacity, lengths, split_counts in CASES:
        batch = len(lengths)
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim)
        q = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))  # a strided view
        k, v = (3 * torch.randn(batch, kv_heads, capacity, head_dim) for _ in range(2))
        for b, length in enumerate(lengths):  # never read
            k[b, :, length:] = float("nan")
            v[b, :, length:] = float("nan")
        expected = decode_attention_reference(q, k, v, seqlens)
        for splits in split_counts:
            error = rel_err(split_kv_decode(q, k, v, seqlens, splits), expected)
            worst = max(worst, error)
            print(f"D={head_dim} H={heads}/{kv_heads} capacity {capacity} lengths {lengths} "
                  f"splits {splits}: {error:.1e}")  # fmt: skip
    return interpreted_verdict(worst, TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
