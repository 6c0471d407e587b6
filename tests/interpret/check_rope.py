"""Run under TRITON_INTERPRET=1 (by tests/test_triton_prefill.py): the Triton rotary embedding
against the PyTorch one, forward and input gradient, float32, fresh random inputs: q and k
read as slices of one qkv tensor (as the attention layer passes them), positions shared (T,)
and per sequence (Bt, T) (the decode step's form), head dims whose half is and is not a power
of two."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import interpreted_verdict, rel_err

from hybrid.kernels.rope import rope_triton
from hybrid.layers.attention import rope_rotate_torch

# the oracle runs in float64; the kernel forms the angle p·θ^(−2i/D) in float32, which at
# positions up to 5000 rounds it by up to ~5000·2⁻²⁴ ≈ 3e-4 rad (measured 2.5e-5 relative)
TOLERANCE = 1e-4


def _heads(qkv, offset: int, width: int, head_dim: int):
    """Heads offset..offset+width of a (Bt, T, heads·D) projection, as a (Bt, T, width, D)
    view: q or k the way the attention layer slices them."""
    columns = qkv[..., offset * head_dim : (offset + width) * head_dim]
    return columns.unflatten(-1, (width, head_dim))


def main() -> int:
    worst = 0.0
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
