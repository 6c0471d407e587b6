"""Functional RMSNorm and grouped gated RMSNorm (PyTorch path; fused Triton kernels come
with the prefill-kernel issue). Statistics are taken in at least float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dimension, result in x's dtype."""
    xf = x.to(_compute_dtype(x.dtype))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(out.dtype)
    return out.to(x.dtype)


def gated_rms_norm(
    y: Tensor,
    z: Tensor,
    weight: Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool = True,
) -> Tensor:
    """Grouped RMSNorm of y with a silu(z) gate, over groups of `group_size` channels.

    norm_before_gate=True is Mamba-3's pre-gate form, norm(y)·w ⊙ silu(z); False is the
    Mamba-2 post-gate form, norm(y ⊙ silu(z))·w.
    """
    dim = y.shape[-1]
    if dim % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension {dim}")
    cdt = _compute_dtype(y.dtype)
    yf, gate = y.to(cdt), F.silu(z.to(cdt))
    if not norm_before_gate:
        yf = yf * gate
    grouped = yf.unflatten(-1, (dim // group_size, group_size))
    normed = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if weight is not None:
        normed = normed * weight.to(cdt)
    if norm_before_gate:
        normed = normed * gate
    return normed.to(y.dtype)
