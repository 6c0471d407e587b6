"""Mamba-3 mixer over a sequence with the Triton chunked scan (training and prefill).

Same contract as `mamba3_chunked`, plus variable-length batches: with `cu_seqlens` the
inputs are one packed row (Bt = 1) of several sequences, each with its own initial and final
state. Triton runs the scan itself (`mamba3_prefill_core`: quadratic within a chunk,
sequential across chunks), the per-token coefficients Δ, A, λ and the per-sequence angle sums
(`mamba3_coefficients`, wrapped as they go, so float32 stays exact over any length), the B/C
RMSNorm, bias and rotation into per-head k and q (`rotated_bc`) and the output stage
(pre-gate norm, silu gate, MIMO sum: `mamba3_gate`; the D skip is the scan's), each with a
Triton backward. The MIMO values x̃_r = mimo_x[:, r] ⊙ x are formed inside the scan kernels;
without autograd (a prefill) the output stage runs inside the scan's output kernel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from hybrid.kernels.mamba3_common import (
    Mamba3Inputs,
    Mamba3Options,
    Mamba3State,
    Mamba3Weights,
    compute_dtype,
    is_power_of_two,
    prefix_state,
)
from hybrid.kernels.projection_grads import ProjectionGrads

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(
    headdim: int, d_state: int, rank: int, dtype: torch.dtype, chunk_tokens: int
) -> str | None:
    """Why the Triton scan cannot take this shape, or None when it can."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (kernels take {KERNEL_DTYPES})"
    for name, value in (("headdim", headdim), ("d_state", d_state), ("mimo_rank", rank)):
        if not is_power_of_two(value) or (name != "mimo_rank" and value < 16):
            return f"{name}={value} (needs a power of two, >= 16 for headdim and d_state)"
    rows = chunk_tokens * rank
    if not is_power_of_two(rows) or rows < 16:
        return f"chunk rows {chunk_tokens}x{rank}={rows} (needs a power of two >= 16)"
    return None


def inputs_unsupported_reason(inputs: Mamba3Inputs, chunk_tokens: int) -> str | None:
    return unsupported_reason(
        inputs.x.shape[-1], inputs.b.shape[-1], inputs.b.shape[2], inputs.x.dtype, chunk_tokens
    )


def sequence_bounds(batch: int, length: int, cu_seqlens) -> list[int]:
    """Token offsets of the sequences on the flattened (Bt·L) axis, checked."""
    if cu_seqlens is None:
        return [b * length for b in range(batch + 1)]
    if batch != 1:
        raise ValueError(f"cu_seqlens needs inputs packed into one row (Bt=1), got Bt={batch}")
    bounds = [
        int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)
    ]
    if bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(f"cu_seqlens must run from 0 to the packed length {length}, got {bounds}")
    return bounds


def check_update_state(state: Mamba3State | None, final_state: bool, update_state: bool) -> None:
    """update_state=True writes the final state into `state`: it needs both."""
    if update_state and (state is None or not final_state):
        raise ValueError("update_state=True needs a state to update and final_state=True")


def mamba3_prefill(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State | None = None,
    chunk_size: int = 64,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    final_state: bool = True,
    grads: ProjectionGrads | None = None,
    update_state: bool = False,
) -> tuple[Tensor, Mamba3State | None]:
    """o (Bt, L, H, P) and the final state (one entry per sequence) from `state` (None: empty).

    chunk_size counts tokens; a chunk holds chunk_size·R score rows (MIMO folds its ranks
    into the rows), which must be a power of two >= 16. final_state=False (training) skips
    gathering the state and returns None for it. With `grads` (the inputs are the pieces
    of one split projection, named as the `Mamba3Inputs` fields) the backward kernels write
    the inputs' gradients into its buffer. update_state=True writes the final state into
    `state` (a decode cache) in place and returns it. Without autograd the cache goes in
    and out through one kernel each (`state_handoff`); a state marked `empty` is not read.
    """
    from hybrid.kernels.chunk_table import chunk_table
    from hybrid.kernels.mamba3_coefficients import mamba3_coefficients
    from hybrid.kernels.mamba3_gate import mamba3_gate
    from hybrid.kernels.mamba3_prefill_core import (
        MAX_GATED_HEADDIM,
        OutputGate,
        mamba3_core,
        mamba3_core_gated,
    )
    from hybrid.kernels.rotated_bc import rotated_bc
    from hybrid.kernels.state_handoff import scan_initial_state, write_final_state

    check_update_state(state, final_state, update_state)
    reason = inputs_unsupported_reason(inputs, chunk_size)
    if reason is None and not inputs.x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"tensors on {inputs.x.device} (it runs on CUDA)"  # not Triton's driver error
    if reason is not None:
        raise ValueError(f"the Triton prefill does not take {reason}")
    batch, length, heads, headdim = inputs.x.shape
    kdt = inputs.x.dtype
    bounds = sequence_bounds(batch, length, cu_seqlens)
    table = chunk_table(tuple(bounds), chunk_size, inputs.x.device)

    def tokens(t: Tensor) -> Tensor:
        return t.reshape(batch * length, *t.shape[2:])

    x, z, b, c, dt, a_raw, trap, angle = (tokens(t) for t in inputs)
    initial = prefix_state(state)
    log_alpha, scale, gamma, beta_free, phi = mamba3_coefficients(
        dt, a_raw, trap, angle, weights.dt_bias, initial.angle if initial is not None else None,
        table, options, grads,
    )  # fmt: skip
    k, q = rotated_bc(
        b, c, weights.b_norm, weights.c_norm, weights.b_bias, weights.c_bias, phi,
        options.bc_norm_eps, options.rotation, kdt, grads,
    )  # fmt: skip
    values = x.unsqueeze(1) if weights.mimo_x is None else x  # MIMO: x̃ formed in the scan
    # the cache in and out by one kernel each (they index its tensors as contiguous)
    fused = not torch.is_grad_enabled() and (
        state is None or all(t.is_contiguous() for t in state.tensors())
    )
    init = None
    if initial is not None:
        # the state carried into each sequence's first token: H_{-1} + β'_0 u_{-1}
        if fused:
            init = scan_initial_state(initial, weights.mimo_x, beta_free, table)
        else:
            first = table.seq_starts[:-1].long()
            init = initial.full_ssm(weights.mimo_x, beta_free[first]).float()

    core = (q, k, values, log_alpha, scale, gamma, init, table, weights.mimo_x, weights.d)
    if torch.is_grad_enabled() or headdim > MAX_GATED_HEADDIM:
        y, final = mamba3_core(*core, grads)
        out = mamba3_gate(
            y, z, weights.mimo_z, weights.mimo_o, weights.out_norm, options.out_norm_eps, grads
        )
    else:  # a prefill: the output stage in the core's output kernel
        gate = OutputGate(z, weights.mimo_z, weights.mimo_o, weights.out_norm, options.out_norm_eps)
        out, final = mamba3_core_gated(*core, gate)
    out = out.reshape(batch, length, heads, headdim)
    if not final_state:
        return out, None
    if update_state and fused:
        write_final_state(state, final, phi, k, x, gamma, weights.mimo_x, table)
        state.empty = False
        return out, state
    state_dtype = state.ssm.dtype if state is not None else compute_dtype(kdt)
    wide = torch.promote_types(state_dtype, torch.float32)
    final_state = Mamba3State.from_full_ssm(
        final,
        angle=phi[table.seq_ends].to(wide),
        k=k[table.seq_ends].to(state.k.dtype if state is not None else kdt),
        x=x[table.seq_ends].to(state.x.dtype if state is not None else kdt),
        gamma=gamma[table.seq_ends].to(wide),
        mimo_x=weights.mimo_x,
        ssm_dtype=state_dtype,
    )
    if update_state:
        state.copy_(final_state)
        return out, state
    return out, final_state
