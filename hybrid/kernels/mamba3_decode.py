"""Entry point for the one-token Mamba-3 update used by `step()` decoding.

On CUDA, `auto` picks the CuTe DSL kernel (`mamba3_step_cute`: P split over warps, the state
streamed once at memory bandwidth) when nvidia-cutlass-dsl imports and the shapes fit, else
the Triton kernel (`mamba3_step_triton`, powers of two only), else PyTorch. The PyTorch path
is the oracle's own token update, used on the CPU (nothing is faster there for one token),
under autograd, and for shapes neither kernel takes. A forced backend that cannot run raises.
Where `auto` falls back to Triton on CUDA only because nvidia-cutlass-dsl is missing, it
warns once: decode latencies measured then overstate MIMO's cost (see `CUTE_MISSING`).
"""

from __future__ import annotations

import functools
import warnings

from torch import Tensor

from hybrid.devices import on_device
from hybrid.kernels.mamba3_common import (
    Mamba3Inputs,
    Mamba3Options,
    Mamba3State,
    Mamba3Weights,
    is_power_of_two,
)
from hybrid.kernels.reference import mamba3_reference_step

DECODE_BACKENDS = ("auto", "torch", "triton", "cute")
# H100, fp32 state, in CUDA graphs (BENCHMARKS.md, "Mamba-3 decode step", run AH and AF)
CUTE_MISSING = (
    "Mamba-3 decode on CUDA runs a fallback step (Triton, or PyTorch where Triton does not "
    "take the sizes): nvidia-cutlass-dsl is not installed (pip install nvidia-cutlass-dsl, "
    "or the `cuda` extra; compute capability 8.0+). The CuTe DSL step is 1.2-1.4x faster than "
    "the Triton one for SISO and 2.0-2.4x for MIMO rank 4 at batch 1 on an H100, so decode "
    "latencies measured without it overstate what MIMO ranks cost."
)


@functools.cache
def warn_cute_missing() -> None:
    """Called where `auto` falls back on CUDA: warns, once per process, if that is for want
    of the CuTe DSL."""
    from hybrid.kernels.mamba3_step_cute import cute_available

    if not cute_available():
        warnings.warn(CUTE_MISSING, stacklevel=3)


def backend_unavailable(token: Mamba3Inputs, state: Mamba3State, backend: str) -> str | None:
    """Why `backend` cannot run these inputs here, or None when it can."""
    if backend == "torch":
        return None
    if backend == "cute":
        from hybrid.kernels.mamba3_step_cute import cute_available, unsupported_reason

        if not cute_available():
            return "nvidia-cutlass-dsl is not installed (pip install nvidia-cutlass-dsl)"
        return unsupported_reason(token, state)
    if not state.ssm.is_cuda:
        return "needs CUDA tensors"
    from hybrid.kernels.mamba3_step_triton import supports

    return None if supports(token, state) else "needs power-of-two headdim/d_state/rank"


def planned_decode_backend(
    requested: str, cuda: bool, headdim: int, d_state: int, rank: int
) -> str:
    """The backend `decode_backend` will pick for a layer of these sizes (no tensors needed:
    what benchmarks and the latency record print)."""
    if requested != "auto":
        return requested
    if not cuda:
        return "torch"
    from hybrid.kernels.mamba3_step_cute import cute_available, shape_reason

    if cute_available() and shape_reason(headdim, d_state, rank, d_state // 4) is None:
        return "cute"
    warn_cute_missing()
    return "triton" if all(is_power_of_two(v) for v in (headdim, d_state, rank)) else "torch"


def decode_backend(token: Mamba3Inputs, state: Mamba3State, requested: str = "auto") -> str:
    """The backend that runs: `requested`, or under `auto` the first of cute, triton, torch
    that can. A forced backend that cannot run raises ValueError naming why."""
    if requested not in DECODE_BACKENDS:
        raise ValueError(f"backend={requested!r} is invalid; allowed: {DECODE_BACKENDS}")
    if requested == "auto":
        if not state.ssm.is_cuda:
            return "torch"
        candidates = ("cute", "triton", "torch")
        chosen = next(b for b in candidates if backend_unavailable(token, state, b) is None)
        if chosen != "cute":
            warn_cute_missing()
        return chosen
    reason = backend_unavailable(token, state, requested)
    if reason is not None:
        raise ValueError(
            f"decode backend {requested!r} cannot run these inputs: {reason}; "
            f"allowed: {DECODE_BACKENDS}"
        )
    return requested


def mamba3_step(
    token: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State,
    backend: str = "auto",
    state_settled: bool = False,
) -> Tensor:
    """Advance `state` in place by one token (inputs without a token axis); returns o (Bt, H, P).

    `state_settled` promises that the kernel launched just before this step does not write
    `state` (a layer's step follows its in_proj): a chained CuTe step then loads the state
    before waiting for that kernel. Two steps of one state back to back must not promise it."""
    chosen = decode_backend(token, state, backend)
    state.empty = False
    if chosen == "torch":
        out, new_state = mamba3_reference_step(token, weights, options, state)
        state.copy_(new_state)
        return out
    with on_device(state.ssm.device):
        if chosen == "cute":
            from hybrid.kernels.mamba3_step_cute import mamba3_step_cute

            return mamba3_step_cute(token, weights, options, state, state_settled)
        from hybrid.kernels.mamba3_step_triton import mamba3_step_triton

        return mamba3_step_triton(token, weights, options, state)
