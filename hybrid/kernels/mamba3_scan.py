"""Entry point for the Mamba-3 mixer core over a sequence (training and prefill)."""

from __future__ import annotations

from torch import Tensor

from hybrid.kernels.chunked import mamba3_chunked
from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3State, Mamba3Weights

SCAN_BACKENDS = ("auto", "chunked")


def mamba3_scan(
    inputs: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Mamba3State]:
    """o (Bt, L, H, P) and the final state, starting from `state` (None: empty prefix)."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid; allowed: {SCAN_BACKENDS}")
    return mamba3_chunked(inputs, weights, options, state, chunk_size)
