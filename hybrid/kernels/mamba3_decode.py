"""Entry point for the one-token Mamba-3 update used by `step()` decoding.

On CUDA the Triton kernel (`mamba3_step_triton`) does the whole update in one launch; the
PyTorch path is the oracle's own token update, used on the CPU (nothing is faster there for
one token), under autograd, and for shapes the kernel does not take (non-power-of-two
headdim, d_state or rank).
"""

from __future__ import annotations

from torch import Tensor

from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3State, Mamba3Weights
from hybrid.kernels.reference import mamba3_reference_step

DECODE_BACKENDS = ("auto", "torch", "triton")


def decode_backend(token: Mamba3Inputs, state: Mamba3State, requested: str = "auto") -> str:
    """`triton` for supported CUDA inputs under `auto`, else `torch`."""
    if requested not in DECODE_BACKENDS:
        raise ValueError(f"backend={requested!r} is invalid; allowed: {DECODE_BACKENDS}")
    if requested != "auto":
        return requested
    if not state.ssm.is_cuda:
        return "torch"
    from hybrid.kernels.mamba3_step_triton import supports

    return "triton" if supports(token, state) else "torch"


def mamba3_step(
    token: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State,
    backend: str = "auto",
) -> Tensor:
    """Advance `state` in place by one token (inputs without a token axis); returns o (Bt, H, P)."""
    if decode_backend(token, state, backend) == "triton":
        from hybrid.kernels.mamba3_step_triton import mamba3_step_triton

        return mamba3_step_triton(token, weights, options, state)
    out, new_state = mamba3_reference_step(token, weights, options, state)
    state.copy_(new_state)
    return out
