"""Entry point for the one-token Mamba-3 update used by `step()` decoding.

The PyTorch path is the oracle's own token update: on the CPU there is nothing faster to do
for one token than the recurrence itself. The CuTe DSL kernel and its Triton fallback plug
in here for CUDA tensors.
"""

from __future__ import annotations

from torch import Tensor

from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3State, Mamba3Weights
from hybrid.kernels.reference import mamba3_reference_step


def mamba3_step(
    token: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State,
) -> Tensor:
    """Advance `state` in place by one token (inputs without a token axis); returns o (Bt, H, P)."""
    out, new_state = mamba3_reference_step(token, weights, options, state)
    state.copy_(new_state)
    return out
