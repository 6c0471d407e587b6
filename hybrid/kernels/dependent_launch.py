"""Programmatic dependent launch (PDL) for the kernels of a graphed decode step.

A batch-1 decode step is a chain of ~60 small kernels (1.5-3.5 us each on an H100), and
each one's launch and first loads are latency its predecessor's tail could hide. A kernel
launched with PDL (compute capability 9.0+) may start while its predecessor still runs;
`griddepcontrol.wait` holds it until the predecessor has completed and its writes are
visible. The kernels that chain this way follow two rules:

- before the wait they load only what their predecessor cannot have written: weights,
  which no kernel of a step writes (optimizer updates are ordinary launches, and an
  ordinary launch waits for the whole chain before it), and, in the CuTe Mamba-3 step its
  layer calls right after in_proj (`state_settled`), the layer's own state and cache, which
  only that layer's previous step writes; activations are read after it;
- they signal `launch_dependents` right after their wait, so a kernel runs ahead of its
  immediate predecessor only, never of an earlier one: what a load before the wait may
  read has one kernel to be checked against, not the chain.

Launches chain only into a CUDA graph being captured (the latency objective, `hybrid
bench`, graphed generation), where the host's launch cost is not replayed, and only for one
or two token rows: there the projections are Triton kernels too (`small_batch_linear`), so
the whole step is one chain. On an H100 chaining took the latency objective's decode step
of 31M models 24-28% shorter at batch 1 and 19-22% at batch 2; at batches 2-64 with cuBLAS
running the projections between the chained kernels it had gained nothing (0.99-1.03x), so
larger batches stay unchained (BENCHMARKS.md, "Chained decode kernels").
HYBRID_PDL=0 turns it off (the benchmark's A/B switch).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("HYBRID_PDL", "1") != "0"
MIN_CAPABILITY = (9, 0)  # griddepcontrol is sm_90 PTX
MIN_CUDA = (12, 3)  # CUDA graphs capture programmatic launches from 12.3 on
# token rows of a chained launch, and the most the matrix-vector kernel takes
# (small_batch_linear): a chain pays where the projections are that kernel, not cuBLAS
MAX_ROWS = 2


def _cuda_version() -> tuple[int, ...]:
    """The CUDA version torch was built with, (0,) for none."""
    return tuple(int(part) for part in (torch.version.cuda or "0").split(".")[:2])


@functools.cache
def _reason_not(index: int) -> str | None:
    """Why device `index` cannot chain launches, or None."""
    if torch.cuda.get_device_capability(index) < MIN_CAPABILITY:
        return "programmatic dependent launch needs compute capability 9.0"
    if _cuda_version() < MIN_CUDA:
        return f"graphs capture programmatic launches from CUDA 12.3 (torch: {torch.version.cuda})"
    return None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def chained(t: Tensor, rows: int) -> bool:
    """Whether a kernel launched now on t's device for `rows` token rows (sequences of a
    decode step) chains to its predecessor by PDL."""
    return (
        ENABLED
        and rows <= MAX_ROWS
        and t.is_cuda
        and torch.cuda.is_current_stream_capturing()
        and _reason_not(_device_index(t.device)) is None
    )


def planned(device: torch.device) -> str:
    """How the decode kernels are chained on `device` (the latency records' entry)."""
    if device.type != "cuda":
        return f"none (device is {device.type})"
    if not ENABLED:
        return "none (HYBRID_PDL=0)"
    if (reason := _reason_not(_device_index(device))) is not None:
        return f"none ({reason})"
    return f"programmatic dependent launch at batch 1-{MAX_ROWS} in CUDA graphs"


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """Where a chained Triton kernel starts reading what earlier kernels wrote (no-op when
    PDL is off: the interpreter has no griddepcontrol)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
