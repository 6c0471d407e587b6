"""The MIMO values x̃_r = mimo_x[h, r] ⊙ x for the scan's backward, in Triton.

The forward scan kernels form x̃ where they load their value rows (`mamba3_prefill_core`), so
the forward neither writes nor keeps an R-fold x̃. The chunk-gradient kernel reads it
materialised (`mimo_values`, at the start of the backward): forming it there too made that
kernel slower than this pass costs (H100, 8 × 2048, R=4: BENCHMARKS.md). Its per-row dx̃ is
then reduced (`mimo_values_grad`): one program reads a block of tokens once, sums the ranks
for dx and its tokens for d mimo_x (a per-block partial the caller adds). In PyTorch the
broadcast product and its reduction cost ~1.9 ms of an 8 × 2048 MIMO R=4 step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_TOKENS = 32  # H100, 8 × 2048, R=4: backward 0.19 ms against 0.36 ms at 16 tokens


@triton.jit
def _offsets(pid, T, H, SX, SDX, h, R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr):
    """Offsets of head h in x (token stride SX), in dx (token stride SDX), in x̃ and in the
    weights."""
    tokens = (pid * BT + tl.arange(0, BT)).to(tl.int64)
    ranks = tl.arange(0, R)
    cols = tl.arange(0, P)
    x_in = (tokens * SX + h * P)[:, None] + cols[None, :]
    dx_offs = (tokens * SDX + h * P)[:, None] + cols[None, :]
    xr_offs = ((tokens[:, None, None] * R + ranks[None, :, None]) * H + h) * P + cols[None, None, :]
    w_offs = (h * R + ranks[:, None]) * P + cols[None, :]
    return tokens < T, x_in, dx_offs, xr_offs, w_offs


@triton.jit
def _values_fwd_kernel(x_ptr, w_ptr, xr_ptr, T, H, SX,
                       R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    h = tl.program_id(1)
    tmask, x_in, _, xr_offs, w_offs = _offsets(tl.program_id(0), T, H, SX, SX, h, R, P, BT)
    x = tl.load(x_ptr + x_in, mask=tmask[:, None], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + w_offs).to(tl.float32)
    xr = x[:, None, :] * w[None, :, :]
    tl.store(xr_ptr + xr_offs, xr.to(xr_ptr.dtype.element_ty), mask=tmask[:, None, None])


@triton.jit
def _values_bwd_kernel(x_ptr, w_ptr, dxr_ptr, dx_ptr, dw_ptr, T, H, SX, SDX,
                       R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    h = tl.program_id(1)
    tmask, x_in, dx_offs, xr_offs, w_offs = _offsets(pid, T, H, SX, SDX, h, R, P, BT)
    x = tl.load(x_ptr + x_in, mask=tmask[:, None], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + w_offs).to(tl.float32)
    dxr = tl.load(dxr_ptr + xr_offs, mask=tmask[:, None, None], other=0.0).to(tl.float32)
    dx = tl.sum(dxr * w[None, :, :], 1)
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(dw_ptr + pid * (H * R * P) + w_offs, tl.sum(dxr * x[:, None, :], 0))


def mimo_values(x: Tensor, mimo_x: Tensor) -> Tensor:
    """x̃ (T, R, H, P) in x's dtype from x (T, H, P) (any token stride with contiguous (H, P)
    entries) and mimo_x (H, R, P) fp32 contiguous."""
    tokens, heads, p = x.shape
    rank = mimo_x.shape[1]
    xr = torch.empty(tokens, rank, heads, p, device=x.device, dtype=x.dtype)
    _values_fwd_kernel[(triton.cdiv(tokens, BLOCK_TOKENS), heads)](
        x, mimo_x, xr, tokens, heads, x.stride(0), R=rank, P=p, BT=BLOCK_TOKENS,
        enable_fp_fusion=True,
    )  # fmt: skip
    return xr


def mimo_values_grad(x: Tensor, mimo_x: Tensor, dxr: Tensor, dx: Tensor) -> Tensor:
    """d mimo_x (H, R, P) fp32 from dx̃ (T, R, H, P), and dx (T, H, P) written into `dx`
    (x's dtype, any token stride: it may be a slice of in_proj's gradient)."""
    tokens, heads, p = x.shape
    rank = mimo_x.shape[1]
    blocks = triton.cdiv(tokens, BLOCK_TOKENS)
    dw = torch.empty(blocks, heads, rank, p, device=x.device, dtype=torch.float32)
    _values_bwd_kernel[(blocks, heads)](
        x, mimo_x, dxr.contiguous(), dx, dw, tokens, heads, x.stride(0), dx.stride(0),
        R=rank, P=p, BT=BLOCK_TOKENS, enable_fp_fusion=True,
    )  # fmt: skip
    return dw.sum(0)
