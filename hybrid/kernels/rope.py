"""Rotary position embedding (rotate-half convention) in Triton, forward and backward.

In PyTorch the rotation is a dozen float32 passes over q and k per call (casts, cos and sin
tables, a negated concatenation, products, a sum, a cast back) and as many again in the
backward: at training shapes each attention layer spent more launches on it than on
attention itself. Here one program per (token block, head) reads a head's rows once (any
batch and token strides, so q and k come straight from the qkv projection), forms cos and sin
from the positions in registers, and writes the rotated rows in the input dtype; the
backward is the same rotation by the negated angle. Positions are a device tensor, (T,)
shared or (Bt, T) per sequence, so a decode step can be graphed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.devices import on_input_device
from hybrid.kernels.launch_args import heads_contiguous
from hybrid.kernels.tensor_cache import tensor_cache

BLOCK_TOKENS = 16


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, pos_ptr, inv_ptr, T, H, SXB, SXT, SPB,
    HALF: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, INVERSE: tl.constexpr,
):  # fmt: skip
    """Rows of head h for BT tokens of sequence b: (x1, x2) -> (x1 c − x2 s, x2 c + x1 s),
    with s negated for the inverse. x has strides (SXB, SXT, 2·HALF, 1); out is contiguous
    (Bt, T, H, 2·HALF); positions have batch stride SPB (0 when shared)."""
    blocks = tl.cdiv(T, BT)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    h = tl.program_id(1)
    t = ((tl.program_id(0) % blocks) * BT + tl.arange(0, BT)).to(tl.int64)
    j = tl.arange(0, HP)
    tmask = t < T
    mask = tmask[:, None] & (j < HALF)[None, :]
    pos = tl.load(pos_ptr + b * SPB + t, mask=tmask, other=0).to(tl.float32)
    angle = pos[:, None] * tl.load(inv_ptr + j, mask=j < HALF, other=0.0)[None, :]
    cos = tl.cos(angle)
    sin = -tl.sin(angle) if INVERSE else tl.sin(angle)
    src = x_ptr + b * SXB + (t * SXT + h * (2 * HALF))[:, None] + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + ((b * T + t) * H + h)[:, None] * (2 * HALF) + j[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@tensor_cache()
def inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """theta^(−2i/D), float32, as `rope_rotate` computes it; one copy per device."""
    return theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def _rotate(x: Tensor, positions: Tensor, inv_freq: Tensor, inverse: bool) -> Tensor:
    x = heads_contiguous(x)
    batch, length, heads, head_dim = x.shape
    out = torch.empty(batch, length, heads, head_dim, device=x.device, dtype=x.dtype)
    half = head_dim // 2
    grid = (batch * triton.cdiv(length, BLOCK_TOKENS), heads)
    _rope_kernel[grid](
        x, out, positions, inv_freq, length, heads, x.stride(0), x.stride(1),
        positions.stride(0) if positions.dim() == 2 else 0,
        HALF=half, HP=triton.next_power_of_2(half), BT=BLOCK_TOKENS, INVERSE=inverse,
        enable_fp_fusion=True,
    )  # fmt: skip
    return out


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
        ctx.save_for_backward(positions, inv_freq)
        return _rotate(x, positions, inv_freq, inverse=False)

    @staticmethod
    def backward(ctx, dout: Tensor):
        positions, inv_freq = ctx.saved_tensors
        return _rotate(dout, positions, inv_freq, inverse=True), None, None


@on_input_device
def rope_triton(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """x (Bt, T, heads, D), D even, any batch/token strides; positions (T,) or (Bt, T).
    Returns the rotated x, contiguous, in x's dtype; differentiable in x."""
    inv_freq = inverse_frequencies(x.shape[-1], float(theta), x.device)
    if positions.dim() == 2 and positions.stride(-1) != 1:
        positions = positions.contiguous()
    return Rope.apply(x, positions, inv_freq)
