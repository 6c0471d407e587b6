"""RMSNorm and the grouped gated RMSNorm as modules (math in hybrid.kernels.norms)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybrid.kernels.norms import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned scale (initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class GroupedGatedRMSNorm(nn.Module):
    """RMSNorm over groups of `group_size` channels, gated by silu(z).

    norm_before_gate=True is the pre-gate form Mamba-3 uses in hybrids (per-head groups),
    False the post-gate form of Mamba-2.
    """

    def __init__(
        self,
        dim: int,
        group_size: int,
        eps: float = 1e-5,
        norm_before_gate: bool = True,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if group_size < 1 or dim % group_size:
            raise ValueError(
                f"group_size={group_size!r} is invalid; allowed: a divisor of dim={dim}"
            )
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
