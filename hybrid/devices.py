"""Which device work runs on: the default when none is named, and making a CUDA device
current for a block of work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The named device, or CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Inside, a CUDA `device` is the current one (the previous comes back after): Triton
    launches its kernels on the current device whatever device their tensors are on, so work
    on `cuda:1` from a process whose current device is 0 would run its kernels on GPU 0."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield
