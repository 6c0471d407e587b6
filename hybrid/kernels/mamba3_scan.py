"""Entry point for the Mamba-3 mixer core over a sequence (training and prefill).

`auto` runs the Triton chunked scan (`mamba3_prefill`) on CUDA for the shapes it takes
(powers of two, chunk rows >= 16) and the PyTorch chunked path elsewhere; `triton` and
`chunked` force one (forcing `triton` on inputs it cannot take is an error that says why).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hybrid.devices import on_device
from hybrid.kernels.chunked import mamba3_chunked
from hybrid.kernels.mamba3_common import (
    Mamba3Inputs,
    Mamba3Options,
    Mamba3State,
    Mamba3Weights,
    prefix_state,
)
from hybrid.kernels.mamba3_prefill import (
    check_update_state,
    mamba3_prefill,
    sequence_bounds,
    unsupported_reason,
)
from hybrid.kernels.projection_grads import ProjectionGrads

SCAN_BACKENDS = ("auto", "chunked", "triton")


def planned_scan_backend(
    requested: str,
    cuda: bool,
    headdim: int,
    d_state: int,
    rank: int,
    dtype: torch.dtype,
    chunk_tokens: int,
) -> str:
    """The backend `mamba3_scan` picks for a layer of these sizes (no tensors needed: what
    the latency record and the benchmarks print)."""
    if requested != "auto":
        return requested
    fits = unsupported_reason(headdim, d_state, rank, dtype, chunk_tokens) is None
    return "triton" if cuda and fits else "chunked"


def scan_backend(inputs: Mamba3Inputs, chunk_size: int, requested: str = "auto") -> str:
    """The backend `mamba3_scan` will run for these inputs."""
    if requested not in SCAN_BACKENDS:
        raise ValueError(f"backend={requested!r} is invalid; allowed: {SCAN_BACKENDS}")
    x, b = inputs.x, inputs.b
    return planned_scan_backend(
        requested, x.is_cuda, x.shape[-1], b.shape[-1], b.shape[2], x.dtype, chunk_size
    )


def run_per_sequence(
    scan: Callable[[Mamba3Inputs, Mamba3State | None], tuple[Tensor, Mamba3State]],
    inputs: Mamba3Inputs,
    state: Mamba3State | None,
    bounds: Sequence[int],
) -> tuple[Tensor, Mamba3State]:
    """`scan(sequence, its state row)` on each sequence of a packed row (Bt = 1) at token
    offsets `bounds`: outputs concatenated along the tokens, final states stacked."""
    outs, finals = [], []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        piece = Mamba3Inputs(*(t[:, start:end] for t in inputs))
        row = Mamba3State(*(t[i : i + 1] for t in state.tensors())) if state is not None else None
        out, final = scan(piece, row)
        outs.append(out)
        finals.append(final)
    stacked = (torch.cat(parts) for parts in zip(*(f.tensors() for f in finals), strict=True))
    return torch.cat(outs, dim=1), Mamba3State(*stacked)


def mamba3_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
    cu_seqlens: Tensor | Sequence[int] | None = None,
    final_state: bool = True,
    grads: ProjectionGrads | None = None,
    update_state: bool = False,
) -> tuple[Tensor, Mamba3State | None]:
    """o (Bt, L, H, P) and the final state, starting from `state` (None: empty prefix).

    chunk_size counts tokens. With `cu_seqlens` (offsets of packed sequences, Bt = 1) every
    sequence starts from its own state row and gets its own final state. final_state=False
    (training without a cache) returns None for the state and spares the Triton path its
    gathering. `grads`, where the inputs are the pieces of one split projection, is its
    gradient buffer: the Triton backward writes the inputs' gradients into it.
    update_state=True writes the final state into `state` (a decode cache: graphs captured
    on it stay valid) in place and returns it. A state marked `empty` is not read.
    """
    check_update_state(state, final_state, update_state)
    chosen = scan_backend(inputs, chunk_size, backend)
    if chosen == "triton":
        with on_device(inputs.x.device):
            return mamba3_prefill(
                inputs, weights, options, state, chunk_size, cu_seqlens, final_state, grads,
                update_state,
            )  # fmt: skip
    initial = prefix_state(state)
    if cu_seqlens is not None:
        bounds = sequence_bounds(inputs.x.shape[0], inputs.x.shape[1], cu_seqlens)
        out, final = run_per_sequence(
            lambda piece, row: mamba3_chunked(piece, weights, options, row, chunk_size),
            inputs, initial, bounds,
        )  # fmt: skip
    else:
        out, final = mamba3_chunked(inputs, weights, options, initial, chunk_size)
    if update_state:
        state.copy_(final)
        return out, state
    return out, final if final_state else None
