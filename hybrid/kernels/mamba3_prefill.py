"""Mamba-3 mixer over a sequence with the Triton chunked scan (training and prefill).

Same contract as `mamba3_chunked`, plus variable-length batches: with `cu_seqlens` the
inputs are one packed row (Bt = 1) of several sequences, each with its own initial and final
state. The per-token pieces (Δ, A, λ, B/C norm and bias, angle sums, rotation, the output
gate) run in PyTorch; the scan itself — the part that is quadratic within a chunk and
sequential across chunks — runs in `mamba3_prefill_core` with a Triton backward. Angles are
summed per sequence in Triton, wrapped as they go, so float32 stays exact over any length.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from hybrid.kernels.mamba3_common import (
    Mamba3Inputs,
    Mamba3Options,
    Mamba3State,
    Mamba3Weights,
    angle_increments,
    compute_dtype,
    discretise,
    expand_x,
    gate_output,
    is_power_of_two,
    normalize_bc,
    rotate,
)

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


def _compiled_on_cuda(fn):
    """`fn` through torch.compile for CUDA tensors (Inductor fuses these per-token element-wise
    pieces, forward and backward, into a few kernels); eager on the CPU and with
    HYBRID_COMPILE=0."""
    compiled = None

    @functools.wraps(fn)
    def run(first: Tensor, *args):
        nonlocal compiled
        if not first.is_cuda or os.environ.get("HYBRID_COMPILE", "1") == "0":
            return fn(first, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(first, *args)

    return run


@_compiled_on_cuda
def _coefficients(dt, a_raw, trap, angle, last, dt_bias, options: Mamba3Options):
    """Per token and head: log α, scale = γ + β'_next (β'_next = 0 at a sequence's last
    token), γ, β', and the angle increments Δ·π·tanh(angle)."""
    disc = discretise(dt, a_raw, trap, dt_bias, options)
    beta_next = torch.cat((disc.beta_free[1:], disc.beta_free[:1] * 0))
    scale = disc.gamma + beta_next.masked_fill(last[:, None], 0.0)
    increments = angle_increments(angle, disc.delta).float()
    return disc.log_alpha.float(), scale.float(), disc.gamma.float(), disc.beta_free, increments


@_compiled_on_cuda
def _rotated_qkv(b, c, x, phi, weights: Mamba3Weights, options: Mamba3Options):
    """q, k = rot(RMSNorm(C|B)·w + bias, φ) per head and rank, x̃ = mimo_x ⊙ x: the core's
    inputs, in x's dtype."""
    phi = phi.unsqueeze(1)  # (T, 1, H, S): shared by every rank
    eps = options.bc_norm_eps
    k = rotate(normalize_bc(b, weights.b_norm, weights.b_bias, eps), phi, options.rotation)
    q = rotate(normalize_bc(c, weights.c_norm, weights.c_bias, eps), phi, options.rotation)
    xr = expand_x(x, weights.mimo_x)
    return q.to(x.dtype), k.to(x.dtype), xr.to(x.dtype)


@_compiled_on_cuda
def _gated(y, x, z, weights: Mamba3Weights, options: Mamba3Options):
    """o = Σ_r mimo_o ⊙ [norm](y_r + D x̃_r) ⊙ silu(mimo_z ⊙ z), in x's dtype."""
    cdt = compute_dtype(x.dtype)
    y = y.to(cdt) + weights.d.to(cdt)[:, None] * expand_x(x, weights.mimo_x)
    return gate_output(y, z, weights, options).to(x.dtype)


def mamba3_prefill(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State | None = None,
    chunk_size: int = 64,
    cu_seqlens: Tensor | Sequence[int] | None = None,
) -> tuple[Tensor, Mamba3State]:
    """o (Bt, L, H, P) and the final state (one entry per sequence) from `state` (None: empty).

    chunk_size counts tokens; a chunk holds chunk_size·R score rows (MIMO folds its ranks
    into the rows), which must be a power of two >= 16.
    """
    from hybrid.kernels.mamba3_prefill_core import chunk_table, mamba3_core
    from hybrid.kernels.segment_cumsum import wrapped_angle_sum

    reason = inputs_unsupported_reason(inputs, chunk_size)
    if reason is not None:
        raise ValueError(f"the Triton prefill does not take {reason}")
    batch, length, heads, headdim = inputs.x.shape
    kdt = inputs.x.dtype
    bounds = sequence_bounds(batch, length, cu_seqlens)
    table = chunk_table(tuple(bounds), chunk_size, inputs.x.device)

    def tokens(t: Tensor) -> Tensor:
        return t.reshape(batch * length, *t.shape[2:])

    x, z, b, c, dt, a_raw, trap, angle = (tokens(t) for t in inputs)
    log_alpha, scale, gamma, beta_free, increments = _coefficients(
        dt, a_raw, trap, angle, table.last_token, weights.dt_bias, options
    )
    phi = wrapped_angle_sum(
        increments, state.angle if state is not None else None, table.seq_starts
    )
    q, k, xr = _rotated_qkv(b, c, x, phi, weights, options)
    init = None
    if state is not None:
        cdt = compute_dtype(kdt)
        outer = torch.einsum("brhp,brhn->bhpn", expand_x(state.x, weights.mimo_x), state.k.to(cdt))
        first = table.seq_starts[:-1].long()
        init = (state.ssm.to(cdt) + beta_free[first][:, :, None, None] * outer).float()

    y, final = mamba3_core(q, k, xr, log_alpha, scale, gamma, init, table, chunk_size)
    out = _gated(y, x, z, weights, options).reshape(batch, length, heads, headdim)
    state_dtype = state.ssm.dtype if state is not None else compute_dtype(kdt)
    final_state = Mamba3State(
        angle=phi[table.seq_ends].to(torch.promote_types(state_dtype, torch.float32)),
        ssm=final.to(state_dtype),
        k=k[table.seq_ends].to(state.k.dtype if state is not None else kdt),
        x=x[table.seq_ends].to(state.x.dtype if state is not None else kdt),
    )
    return out, final_state
