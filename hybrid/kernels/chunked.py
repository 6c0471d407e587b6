"""Mamba-3 mixer core in chunked matrix form: the CPU path, differentiable by autograd, and
the reference the Triton prefill kernels are checked against.

The trapezoidal recurrence H_t = α_t H_{t-1} + β_t u_{t-1} + γ_t u_t (u_t = Σ_r x̃_r k_rᵀ)
becomes a plain linear SSM in G_t = H_t + β'_{t+1} u_t (β = α·β'):

    G_t = α_t G_{t-1} + scale_t u_t,   scale_t = γ_t + β'_{t+1}   (β'_L = 0)
    H_t = G_t − β'_{t+1} u_t,          H_{L-1} = G_{L-1}

so within a chunk, with c_t the cumulative log α since the chunk start,

    y_t = e^{c_t} G_start q_t + Σ_{s<t} e^{c_t−c_s} scale_s (q_t·k_s) x̃_s
          + γ_t (q_t·k_t) x̃_t + D x̃_t

(MIMO folds the rank into the score matrix: every (t, r) row sees every (s, r') column).
Chunks carry G and the wrapped angle; an initial state, whose cache holds H⁻_in = H_in −
γ_in u_in (see `Mamba3State`), enters as G = H⁻_in + (γ_in + β'_0) u_in, and the final one
leaves as H⁻_L = G_{L-1} − γ_{L-1} u_{L-1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    normalize_bc,
    rotate,
    wrap_angle,
)
from hybrid.kernels.reference import empty_state_like


def _to_chunks(t: Tensor, chunk_size: int) -> Tensor:
    """(Bt, L, ...) -> (Bt, n_chunks, chunk_size, ...), zero-padding the last chunk.

    Zero log α, scale, γ and inputs make padded tokens the identity on the carried state.
    """
    length = t.shape[1]
    pad = -length % chunk_size
    if pad:
        t = torch.cat((t, t.new_zeros(t.shape[0], pad, *t.shape[2:])), dim=1)
    return t.unflatten(1, (-1, chunk_size))


def _cumulative_angles(increments: Tensor, start: Tensor, chunk_size: int) -> Tensor:
    """φ_t = φ_start + Σ_{s≤t} increments_s, wrapped, carried chunk by chunk so the sum
    never grows past one chunk's worth (float32 stays exact to a few ulps)."""
    length = increments.shape[1]
    within = _to_chunks(increments, chunk_size).cumsum(dim=2)  # (Bt, nc, Q, H, S)
    carried = []
    phi = start
    for chunk in within.unbind(dim=1):
        carried.append(wrap_angle(phi.unsqueeze(1) + chunk))
        phi = carried[-1][:, -1]
    return torch.cat(carried, dim=1)[:, :length]


def mamba3_chunked(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Mamba3State]:
    """Same contract as `mamba3_reference`: (o (Bt, L, H, P), final state)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid; allowed: an integer >= 1")
    length = inputs.x.shape[1]
    if length < 1:
        raise ValueError("mamba3_chunked needs at least one token")
    if state is None:
        state = empty_state_like(inputs, compute_dtype(inputs.x.dtype))

    disc = discretise(inputs.dt, inputs.a, inputs.trap, weights.dt_bias, options)
    cdt = disc.delta.dtype
    phi = _cumulative_angles(
        angle_increments(inputs.angle, disc.delta), state.angle.to(cdt), chunk_size
    )
    phi_r = phi.unsqueeze(2)  # (Bt, L, 1, H, S), shared by every rank
    k = rotate(
        normalize_bc(inputs.b, weights.b_norm, weights.b_bias, options.bc_norm_eps),
        phi_r,
        options.rotation,
    )
    q = rotate(
        normalize_bc(inputs.c, weights.c_norm, weights.c_bias, options.bc_norm_eps),
        phi_r,
        options.rotation,
    )
    xr = expand_x(inputs.x, weights.mimo_x)  # (Bt, L, R, H, P)

    beta_next = F.pad(disc.beta_free[:, 1:], (0, 0, 0, 1))
    scale = disc.gamma + beta_next  # (Bt, L, H)
    g = state.full_ssm(weights.mimo_x, disc.beta_free[:, 0]).to(cdt)  # H_{-1} + β'_0 u_{-1}

    log_alpha_c, scale_c, gamma_c = (
        _to_chunks(t, chunk_size) for t in (disc.log_alpha, scale, disc.gamma)
    )
    q_c, k_c, x_c = (_to_chunks(t, chunk_size) for t in (q, k, xr))
    cum = log_alpha_c.cumsum(dim=2)  # (Bt, nc, Q, H)

    # Intra-chunk weights W[t, s]: e^{c_t - c_s} scale_s below the diagonal, γ_t on it.
    positions = torch.arange(chunk_size, device=cum.device)
    below = positions[:, None] > positions[None, :]
    seg = cum.transpose(2, 3).unsqueeze(-1) - cum.transpose(2, 3).unsqueeze(-2)  # (Bt,nc,H,t,s)
    decay = torch.where(below, seg, torch.full_like(seg, float("-inf"))).exp()
    weight = decay * scale_c.transpose(2, 3).unsqueeze(-2)
    weight = weight + torch.diag_embed(gamma_c.transpose(2, 3))

    scores = torch.einsum("bctrhn,bcsuhn->bchtrsu", q_c, k_c)
    scores = scores * weight[:, :, :, :, None, :, None]
    y = torch.einsum("bchtrsu,bcsuhp->bctrhp", scores, x_c)

    # Each chunk's own contribution to G at its end, and its total decay.
    to_end = (cum[:, :, -1:] - cum).exp() * scale_c  # (Bt, nc, Q, H)
    chunk_g = torch.einsum("bcsh,bcsrhp,bcsrhn->bchpn", to_end, x_c, k_c)
    chunk_decay = cum[:, :, -1].exp()  # (Bt, nc, H)
    starts = []
    for j in range(cum.shape[1]):
        starts.append(g)
        g = chunk_decay[:, j, :, None, None] * g + chunk_g[:, j]
    g_start = torch.stack(starts, dim=1)  # (Bt, nc, H, P, N)

    y = y + torch.einsum("bcth,bctrhn,bchpn->bctrhp", cum.exp(), q_c, g_start)
    y = y.flatten(1, 2)[:, :length] + weights.d.to(cdt)[:, None] * xr
    out = gate_output(y, inputs.z, weights, options)
    final = Mamba3State.from_full_ssm(
        g,
        angle=phi[:, -1].to(state.angle.dtype),
        k=k[:, -1].to(state.k.dtype),
        x=inputs.x[:, -1].to(state.x.dtype),
        gamma=disc.gamma[:, -1].to(state.gamma.dtype),
        mimo_x=weights.mimo_x,
        ssm_dtype=state.ssm.dtype,
    )
    return out.to(inputs.x.dtype), final
