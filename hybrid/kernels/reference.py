"""The oracle: the Mamba-3 mixer core as a naive token-by-token recurrence (MAMBA3.md §2).

For every head h and token t, with the trapezoidal coefficients of `discretise`:

    H_t = α_t H_{t-1} + β_t Σ_r x̃_{t-1,r} k_{t-1,r}ᵀ + γ_t Σ_r x̃_{t,r} k_{t,r}ᵀ
    y_{t,r} = H_t q_{t,r} + D x̃_{t,r}
    o_t = Σ_r mimo_o_r ⊙ [norm(y_{t,r})] ⊙ silu(mimo_z_r ⊙ z_t)

with k = rot(RMSNorm(B) + B_bias, φ_t), q = rot(RMSNorm(C) + C_bias, φ_t) and
φ_t = φ_{t-1} + Δ_t π tanh(angle_t). The state it passes on holds H⁻_t = H_t − γ_t Σ_r x̃_{t,r}
k_{t,r}ᵀ (see `Mamba3State`); it converts at that boundary and runs the recurrence on H.
Slow by design: every faster path is checked against it.
"""

from __future__ import annotations

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
    normalize_bc,
    rotate,
    token_outer,
    wrap_angle,
)


def empty_state_like(inputs: Mamba3Inputs, state_dtype: torch.dtype) -> Mamba3State:
    """A zero state matching `inputs` (with a token axis) for a sequence with no prefix."""
    batch, _, n_heads, headdim = inputs.x.shape
    return Mamba3State.zeros(
        batch,
        n_heads,
        headdim,
        inputs.b.shape[-1],
        inputs.angle.shape[-1],
        inputs.b.shape[2],
        dtype=inputs.x.dtype,
        state_dtype=state_dtype,
        device=inputs.x.device,
    )


def mamba3_reference_step(
    token: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State,
) -> tuple[Tensor, Mamba3State]:
    """Advance one token. `token` has no token axis; returns (o (Bt, H, P), new state)."""
    disc = discretise(token.dt, token.a, token.trap, weights.dt_bias, options)
    cdt = disc.delta.dtype
    alpha = disc.log_alpha.exp()

    phi = wrap_angle(state.angle.to(cdt) + angle_increments(token.angle, disc.delta))
    k = rotate(
        normalize_bc(token.b, weights.b_norm, weights.b_bias, options.bc_norm_eps),
        phi.unsqueeze(-3),
        options.rotation,
    )
    q = rotate(
        normalize_bc(token.c, weights.c_norm, weights.c_bias, options.bc_norm_eps),
        phi.unsqueeze(-3),
        options.rotation,
    )
    xr = expand_x(token.x, weights.mimo_x)
    outer_now = token_outer(token.x, k, weights.mimo_x).to(cdt)
    # α H_{t-1} + β u_{t-1} = α (H_{t-1} + β' u_{t-1}), with β = α β'
    carried = state.full_ssm(weights.mimo_x, disc.beta_free).to(cdt)
    ssm = alpha[..., None, None] * carried + disc.gamma[..., None, None] * outer_now
    y = torch.einsum("bhpn,brhn->brhp", ssm, q) + weights.d.to(cdt)[:, None] * xr
    out = gate_output(y, token.z, weights, options)
    # the cache's H⁻ subtracts the γ term of the k and x it keeps (rounded to its dtypes);
    # where they are not rounded, that term's product is this step's
    k_cached, x_cached = k.to(state.k.dtype), token.x.to(state.x.dtype)
    unrounded = k_cached.dtype == k.dtype and x_cached.dtype == token.x.dtype
    new_state = Mamba3State.from_full_ssm(
        ssm,
        angle=phi.to(state.angle.dtype),
        k=k_cached,
        x=x_cached,
        gamma=disc.gamma.to(state.gamma.dtype),
        mimo_x=weights.mimo_x,
        ssm_dtype=state.ssm.dtype,
        outer=outer_now if unrounded else None,
    )
    return out.to(token.x.dtype), new_state


def mamba3_reference(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State | None = None,
) -> tuple[Tensor, Mamba3State]:
    """Run the recurrence over (Bt, L, ...) inputs; returns (o (Bt, L, H, P), final state)."""
    if state is None:
        state = empty_state_like(inputs, compute_dtype(inputs.x.dtype))
    outputs = []
    for t in range(inputs.x.shape[1]):
        out, state = mamba3_reference_step(
            Mamba3Inputs(*(field[:, t] for field in inputs)), weights, options, state
        )
        outputs.append(out)
    return torch.stack(outputs, dim=1), state
