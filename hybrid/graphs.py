"""CUDA graphs of decode steps and training steps: launch overhead is host time, not the
architecture's, and a graph removes it (10× for an eager Mamba-3 decode step on an H100,
2.2× for a ~20M hybrid's training step: BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def host_syncs_raise() -> Iterator[None]:
    """Inside, a host synchronisation (`.item()`, a blocking copy) raises. No graph can hold
    one, and a capture that fails leaves torch's CUDA generator unusable for the rest of the
    process ("Offset increment outside graph capture"), so a step is run under this before
    it is captured: one that synchronises fails there, with the culprit named."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": it is, and it says so each time
        warnings.filterwarnings("ignore", "Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def record_graph(
    step: Callable[[], T], device: torch.device | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """A CUDA graph of one call of `step`, captured (not run) on a stream of its own, and what
    that call returned: the tensors a replay writes. The current stream comes back even if
    the capture fails, which `torch.cuda.graph`'s own exit does not ensure."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        outputs = step()
    return graph, outputs


def capture_cuda_graph(step: Callable[[], Any], warmup: int = 3) -> Callable[[], Any]:
    """A CUDA graph of `step`, run `warmup` times on a side stream first (lazy initialisation
    and compilation must not happen during capture); returns its replay. The warm-up runs
    are real: whatever `step` updates in place, they update too. With two or more, the last
    runs under `host_syncs_raise` (the first may compile and autotune, which synchronise)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in range(warmup):
            last = warmup > 1 and call == warmup - 1
            with host_syncs_raise() if last else contextlib.nullcontext():
                step()
    torch.cuda.current_stream().wait_stream(stream)
    graph, _ = record_graph(step)
    return graph.replay
