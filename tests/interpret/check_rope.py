"""Run under TRITON_INTERPRET=1 (by tests/test_triton_prefill.py): the Triton rotary embedding
against the PyTorch one, forward and input gradient, float32, fresh random inputs: q and k
read as slices of one qkv tensor (as the attention layer passes them), positions shared (T,)
and per sequence (Bt, T) (the decode step's form), head dims whose half is and is not a power
of two; and a prompt's append into a KV cache (`kv_prompt`): q and k rotated bit for bit as
the RoPE kernel rotates them, k and v at their positions of a cache of random entries (every
other entry unchanged), the positions set; with RoPE and without, from an empty and from a
filled cache."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import interpreted_verdict, rel_err

from hybrid.kernels.kv_prompt import append_prompt
from hybrid.kernels.rope import inverse_frequencies, rope_triton
from hybrid.layers.attention import rope_rotate_torch

# the oracle runs in float64; the kernel forms the angle p·θ^(−2i/D) in float32, which at
# positions up to 5000 rounds it by up to ~5000·2⁻²⁴ ≈ 3e-4 rad (measured 2.5e-5 relative)
TOLERANCE = 1e-4


def _heads(qkv, offset: int, width: int, head_dim: int):
    """Heads offset..offset+width of a (Bt, T, heads·D) projection, as a (Bt, T, width, D)
    view: q or k the way the attention layer slices them."""
    columns = qkv[..., offset * head_dim : (offset + width) * head_dim]
    return columns.unflatten(-1, (width, head_dim))


def check_prompt_append() -> float:
    worst = 0.0
    for (head_dim, heads, kv_heads), rope, offset in itertools.product(
        ((32, 4, 2), (48, 3, 1)), (True, False), (0, 5)
    ):
        batch, length, capacity = 2, 19, 30
        qkv = torch.randn(batch, length, (heads + 2 * kv_heads) * head_dim)
        q, k, v = (
            _heads(qkv, *part, head_dim)
            for part in ((0, heads), (heads, kv_heads), (heads + kv_heads, kv_heads))
        )
        k_cache, v_cache = torch.randn(2, batch, kv_heads, capacity, head_dim)
        seqlens = torch.full((batch,), offset, dtype=torch.int32)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        positions = torch.arange(offset, offset + length)
        want_q, want_k = q, k
        if rope:
            want_q, want_k = (rope_triton(t, positions, 10000.0) for t in (q, k))
        expected_k[:, :, offset : offset + length] = want_k.transpose(1, 2)
        expected_v[:, :, offset : offset + length] = v.transpose(1, 2)
        inv_freq = inverse_frequencies(head_dim, 10000.0, q.device) if rope else None
        q_out, k_out = append_prompt(q, k, v, k_cache, v_cache, seqlens, offset, inv_freq)
        same = (torch.equal(q_out, want_q) and torch.equal(k_out, want_k)
                and torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
                and bool((seqlens == offset + length).all()))  # fmt: skip
        oracle = rope_rotate_torch(q.double(), positions, 10000.0) if rope else q.double()
        error = rel_err(q_out, oracle)
        worst = max(worst, error if same else float("inf"))
        print(f"prompt append D={head_dim} heads={heads}/{kv_heads} rope={rope} "
              f"offset={offset}: {'bit for bit as expected' if same else 'MISMATCH'}, "
              f"q against float64 {error:.1e}")  # fmt: skip
    return worst


def main() -> int:
    worst = check_prompt_append()
    for head_dim, heads, kv_heads in ((32, 4, 2), (48, 3, 1)):
        batch, length = 3, 21
        qkv = torch.randn(batch, length, (heads + 2 * kv_heads) * head_dim)
        for positions in (
            torch.arange(7, 7 + length),
            torch.randint(0, 5000, (batch, length)),
        ):
            for width, offset in ((heads, 0), (kv_heads, heads)):
                leaf, ref_leaf = qkv.clone().requires_grad_(), qkv.double().requires_grad_()
                sliced = (offset, width, head_dim)
                out = rope_triton(_heads(leaf, *sliced), positions, 10000.0)
                expected = rope_rotate_torch(_heads(ref_leaf, *sliced), positions, 10000.0)
                probe = torch.randn_like(expected)
                (out * probe.float()).sum().backward()
                (expected * probe).sum().backward()
                errors = (rel_err(out, expected), rel_err(leaf.grad, ref_leaf.grad))
                worst = max(worst, *errors)
                print(
                    f"D={head_dim} heads={width} positions {tuple(positions.shape)}: "
                    f"out {errors[0]:.1e}, dx {errors[1]:.1e}"
                )
    return interpreted_verdict(worst, TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
