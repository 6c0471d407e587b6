"""Which device work runs on: the default when none is named, pinning a process to one GPU,
making a CUDA device current for a block of work, and the dtype autocast computes in there."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The named device (checked: a CPU or a visible CUDA device), or CUDA when there is
    one, else the CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "cpu, cuda, cuda:N"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is invalid; allowed: {allowed}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is invalid; allowed: {allowed}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r}: no CUDA device is visible; allowed: cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device={device!r}: only {count} CUDA device(s) are visible; allowed: "
                f"cpu, cuda, cuda:0..cuda:{count - 1}"
            )
    return resolved


def visible_devices_for(gpu: int) -> str:
    """The CUDA_VISIBLE_DEVICES that pins a process to GPU `gpu` as this process numbers its
    GPUs: through an inherited CUDA_VISIBLE_DEVICES (a scheduler such as Slurm sets it to the
    job's GPUs, and id 0 is then the job's first GPU, not the host's)."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return str(gpu)
    entries = [e.strip() for e in inherited.split(",") if e.strip()]
    if not 0 <= gpu < len(entries):
        allowed = f"0..{len(entries) - 1}" if entries else "none: no GPU is visible"
        raise ValueError(
            f"GPU id {gpu} is not visible to this process (CUDA_VISIBLE_DEVICES="
            f"{inherited!r}); allowed ids: {allowed}"
        )
    return entries[gpu]


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which a CUDA `device` is the current one (the previous comes back after).
    Triton and the CuTe DSL launch their kernels on the current device's stream whatever device
    their tensors are on, so every kernel entry point runs in one: work on `cuda:1` from a
    process whose current device is 0 would otherwise run its kernels on GPU 0."""
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()  # the CPU, or "cuda": the current device already
    return torch.cuda.device(device)


def on_input_device(launch: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a kernel entry point whose first argument is a tensor: it runs with that
    tensor's device current (`on_device`)."""

    @functools.wraps(launch)
    def run(first: torch.Tensor, *args, **kwargs) -> T:
        with on_device(first.device):
            return launch(first, *args, **kwargs)

    return run


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere (the interpreter: one program at a time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts matmul operands to on t's device, or None where it is off."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
