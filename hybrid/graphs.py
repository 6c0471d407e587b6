"""CUDA graphs of decode steps: launch overhead is host time, not the architecture's, and a
graph removes it (10× for an eager Mamba-3 step on an H100, BENCHMARKS.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def capture_cuda_graph(step: Callable[[], Any], warmup: int = 3) -> Callable[[], Any]:
    """A CUDA graph of `step`, run `warmup` times on a side stream first (lazy initialisation
    and compilation must not happen during capture); returns its replay. The warm-up runs
    are real: whatever `step` updates in place, they update too."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
