"""A decode cache into and out of the Triton prefill, one kernel each way.

A prefill that continues from a cache (`Mamba3State`: H⁻ = H − γ·u, u = Σ_r x̃_r k_rᵀ of the
cached token) starts each sequence's scan from the state carried into its first token,
H⁻ + (γ + β'_first)·u, and leaves the cache of its last token: H⁻_T = H_T − γ_T·u_T with that
token's angles, k, x and γ. Composed in PyTorch (`Mamba3State.full_ssm`, `from_full_ssm`,
the gathers, the casts and the copy into the cache) that was ~25 small kernels a layer: a
graphed batch-1 prefill of 512 tokens into a cache took 865 µs for a 31M `M-` × 8 where the
same forward without a cache took 469 (H100). Here `scan_initial_state` forms the scans'
initial states and `write_final_state` writes the cache in place, each one launch over
(sequence, head, row block). Without autograd only: under it the PyTorch forms stay (their
gradients are PyTorch's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.launch_args import heads_contiguous, pointer_or
from hybrid.kernels.mamba3_common import Mamba3State

TILE = 4096  # (rows × d_state) state values a program owns at most


@triton.jit
def _token_outer(x_ptr, k_ptr, mx_ptr, k_rank_stride, rows, cols, X_TYPE: tl.constexpr,
                 K_TYPE: tl.constexpr, P: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
                 BP: tl.constexpr, HAS_MX: tl.constexpr):  # fmt: skip
    """u[rows, cols] = Σ_r x̃_r k_rᵀ of one (token, head) in float32: x̃_r = mimo_x_r ⊙ x from
    x at x_ptr (P values) and mimo_x rows at mx_ptr (stride P), k_r at k_ptr + r·k_rank_stride;
    x and k first rounded to X_TYPE and K_TYPE, the dtypes the cache keeps them in."""
    x = tl.load(x_ptr + rows).to(X_TYPE).to(tl.float32)
    outer = tl.zeros([BP, N], dtype=tl.float32)
    for r in tl.static_range(R):
        xr = x * tl.load(mx_ptr + r * P + rows).to(tl.float32) if HAS_MX else x
        k = tl.load(k_ptr + r * k_rank_stride + cols).to(K_TYPE).to(tl.float32)
        outer += xr[:, None] * k[None, :]
    return outer


@triton.jit
def _initial_state_kernel(ssm_ptr, k_ptr, x_ptr, gamma_ptr, mx_ptr, betaf_ptr, starts_ptr,
                          init_ptr, H, P: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
                          BP: tl.constexpr, HAS_MX: tl.constexpr):  # fmt: skip
    """Program (sequence, head, row block): init = H⁻ + (γ + β' of the first token)·u."""
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rows = tl.program_id(2) * BP + tl.arange(0, BP)
    cols = tl.arange(0, N)
    bh = seq * H + h
    first = tl.load(starts_ptr + seq).to(tl.int64)
    coeff = tl.load(gamma_ptr + bh).to(tl.float32) + tl.load(betaf_ptr + first * H + h)
    outer = _token_outer(x_ptr + bh * P, k_ptr + (seq * R * H + h) * N, mx_ptr + h * R * P,
                         H * N, rows, cols, x_ptr.dtype.element_ty, k_ptr.dtype.element_ty,
                         P, N, R, BP, HAS_MX)  # fmt: skip
    tile = bh * (P * N) + rows[:, None] * N + cols[None, :]
    tl.store(init_ptr + tile, tl.load(ssm_ptr + tile).to(tl.float32) + coeff * outer)


@triton.jit
def _final_state_kernel(final_ptr, phi_ptr, k_ptr, x_ptr, gamma_ptr, mx_ptr, ends_ptr,
                        ssm_ptr, angle_ptr, kc_ptr, xc_ptr, gc_ptr, H, S, SX,
                        P: tl.constexpr, N: tl.constexpr, R: tl.constexpr, BP: tl.constexpr,
                        SB: tl.constexpr, HAS_MX: tl.constexpr):  # fmt: skip
    """Program (sequence, head, row block): the cache of the sequence's last token t, in
    place: H⁻ = H_T − γ_t·u_t over its rows; the first row block also writes the angles, k,
    x and γ of t (in the cache's dtypes)."""
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    block = tl.program_id(2)
    rows = block * BP + tl.arange(0, BP)
    cols = tl.arange(0, N)
    bh = seq * H + h
    t = tl.load(ends_ptr + seq)
    g = tl.load(gamma_ptr + t * H + h)
    x_row = x_ptr + t * SX + h * P
    k_row = k_ptr + (t * R * H + h) * N
    outer = _token_outer(x_row, k_row, mx_ptr + h * R * P, H * N, rows, cols,
                         xc_ptr.dtype.element_ty, kc_ptr.dtype.element_ty, P, N, R, BP,
                         HAS_MX)  # fmt: skip
    tile = bh * (P * N) + rows[:, None] * N + cols[None, :]
    ssm = tl.load(final_ptr + tile) - g * outer
    tl.store(ssm_ptr + tile, ssm.to(ssm_ptr.dtype.element_ty))
    if block == 0:
        s = tl.arange(0, SB)
        phi = tl.load(phi_ptr + (t * H + h) * S + s, mask=s < S)
        tl.store(angle_ptr + bh * S + s, phi.to(angle_ptr.dtype.element_ty), mask=s < S)
        for r in tl.static_range(R):
            k = tl.load(k_row + r * (H * N) + cols)
            tl.store(kc_ptr + ((seq * R + r) * H + h) * N + cols, k.to(kc_ptr.dtype.element_ty))
        p = tl.arange(0, P)
        tl.store(xc_ptr + bh * P + p, tl.load(x_row + p).to(xc_ptr.dtype.element_ty))
        tl.store(gc_ptr + bh, g.to(gc_ptr.dtype.element_ty))


def _grid(n_seq: int, heads: int, headdim: int, d_state: int) -> tuple[tuple[int, ...], int]:
    rows = min(headdim, max(1, TILE // d_state))
    return (n_seq, heads, headdim // rows), rows


def scan_initial_state(
    state: Mamba3State, mimo_x: Tensor | None, beta_free: Tensor, table: ChunkTable
) -> Tensor:
    """Each sequence's scan initial state (n_seq, H, P, N) float32 from its cache row:
    `state.full_ssm(mimo_x, beta_free[first token])` in one launch. beta_free: (T, H) float32."""
    n_seq, heads, headdim, d_state = state.ssm.shape
    rank = state.k.shape[1]
    init = torch.empty(state.ssm.shape, device=state.ssm.device, dtype=torch.float32)
    grid, rows = _grid(n_seq, heads, headdim, d_state)
    _initial_state_kernel[grid](
        state.ssm, state.k, state.x, state.gamma, pointer_or(mimo_x, state.gamma),
        beta_free, table.seq_starts, init, heads,
        P=headdim, N=d_state, R=rank, BP=rows, HAS_MX=mimo_x is not None,
    )  # fmt: skip
    return init


def write_final_state(
    state: Mamba3State,
    final: Tensor,
    phi: Tensor,
    k: Tensor,
    x: Tensor,
    gamma: Tensor,
    mimo_x: Tensor | None,
    table: ChunkTable,
) -> None:
    """Overwrite `state` (n_seq rows) in place with the cache of each sequence's last token:
    `Mamba3State.from_full_ssm(final, ...)` of that token's phi (T, H, S), k (T, R, H, N),
    x (T, H, P, any token stride) and gamma (T, H), in one launch."""
    n_seq, heads, headdim, d_state = state.ssm.shape
    rank, n_angles = state.k.shape[1], state.angle.shape[-1]
    x = heads_contiguous(x)
    grid, rows = _grid(n_seq, heads, headdim, d_state)
    _final_state_kernel[grid](
        final.contiguous(), phi.contiguous(), k.contiguous(), x, gamma.contiguous(),
        pointer_or(mimo_x, gamma), table.seq_ends, state.ssm, state.angle, state.k, state.x,
        state.gamma, heads, n_angles, x.stride(0), P=headdim, N=d_state, R=rank, BP=rows,
        SB=triton.next_power_of_2(max(n_angles, 1)), HAS_MX=mimo_x is not None,
    )  # fmt: skip
