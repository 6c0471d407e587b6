"""Run under TRITON_INTERPRET=1 (by tests/test_attention_decode.py): the split-KV decode
kernel against softmax attention in float64, float32, fresh random inputs: GQA groups of 1, 3
and 4 query heads, per-sequence lengths from 1 to the cache's capacity (positions past them
hold NaN, so a read of one shows), one split and several (some beyond a sequence's length,
hence empty), q read as a slice of a wider projection."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import interpreted_verdict, rel_err

from hybrid.kernels.attention_decode import split_kv_decode

TOLERANCE = 1e-5
CASES = [  # head_dim, heads, kv_heads, capacity, seqlens, split counts
    (16, 4, 1, 300, [1, 300, 131], [1, 3, 7]),
    (32, 6, 2, 200, [77, 200], [1, 4]),
    (16, 2, 2, 64, [64, 5], [1, 2]),
]


def reference(q, k, v, seqlens):
    """Softmax attention of q (Bt, 1, H, D) over each sequence's first seqlens[b] keys."""
    group = q.shape[2] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, length in enumerate(seqlens.tolist()):
        keys = k[b, :, :length].double().repeat_interleave(group, 0)
        values = v[b, :, :length].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hld->hl", q[b, 0].double(), keys) / math.sqrt(q.shape[-1])
        out[b, 0] = torch.einsum("hl,hld->hd", scores.softmax(-1), values)
    return out


def main() -> int:
    worst = 0.0
    for head_dim, heads, kv_heads, capacity, lengths, split_counts in CASES:
        batch = len(lengths)
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim)
        q = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))  # a strided view
        k, v = (3 * torch.randn(batch, kv_heads, capacity, head_dim) for _ in range(2))
        for b, length in enumerate(lengths):  # never read
            k[b, :, length:] = float("nan")
            v[b, :, length:] = float("nan")
        expected = reference(q, k, v, seqlens)
        for splits in split_counts:
            error = rel_err(split_kv_decode(q, k, v, seqlens, splits), expected)
            worst = max(worst, error)
            print(f"D={head_dim} H={heads}/{kv_heads} capacity {capacity} lengths {lengths} "
                  f"splits {splits}: {error:.1e}")  # fmt: skip
    return interpreted_verdict(worst, TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
