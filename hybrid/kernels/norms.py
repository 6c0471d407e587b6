"""Functional RMSNorm, grouped gated RMSNorm and the SwiGLU product: the fused Triton kernels
(`fused_norms`) on CUDA, PyTorch elsewhere (and for float64). Statistics are taken in at
least float32 either way."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _fused_applies(x: Tensor) -> bool:
    if not x.is_cuda:
        return False
    from hybrid.kernels.fused_norms import takes

    return takes(x)


def rms_norm(
    x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    """RMSNorm over the last dimension, result in out_dtype (None: x's dtype)."""
    if _fused_applies(x):
        from hybrid.kernels.fused_norms import fused_gated_rms_norm

        return fused_gated_rms_norm(x, None, weight, eps, x.shape[-1], out_dtype=out_dtype)
    xf = x.to(_compute_dtype(x.dtype))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(out.dtype)
    return out.to(out_dtype or x.dtype)


def add_rms_norm(
    x: Tensor,
    delta: Tensor | None,
    weight: Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The pre-norm residual step: r = x + δ (x itself when δ is None) and RMSNorm(r), in
    one fused pass on CUDA. r takes the promoted dtype of x and δ, as `x + δ` would; the
    norm takes out_dtype (None: r's)."""
    if delta is None:
        return x, rms_norm(x, weight, eps, out_dtype)
    if _fused_applies(x) and _fused_applies(delta) and x.shape == delta.shape:
        from hybrid.kernels.fused_norms import fused_add_rms_norm

        return fused_add_rms_norm(x, delta, weight, eps, out_dtype)
    summed = x + delta
    return summed, rms_norm(summed, weight, eps, out_dtype)


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
    if _fused_applies(y) and z.dtype == y.dtype:
        from hybrid.kernels.fused_norms import fused_gated_rms_norm

        return fused_gated_rms_norm(y, z, weight, eps, group_size, norm_before_gate)
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


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) ⊙ up from the fused projection h = [gate | up] (last dim 2·hidden)."""
    if _fused_applies(h):
        from hybrid.kernels.fused_norms import fused_swiglu

        return fused_swiglu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
