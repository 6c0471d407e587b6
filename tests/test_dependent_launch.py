"""When decode kernels chain by programmatic dependent launch, decided without a GPU: never
off CUDA, and on CUDA only where the device and torch's CUDA can (the launches themselves:
tests/test_gpu_dependent_launch.py; their wait placement: tests/test_kernels_compile.py)."""

from __future__ import annotations

import torch

import hybrid.kernels.dependent_launch as dl


def test_never_off_cuda():
    assert not dl.chained(torch.ones(3), 1)
    assert dl.planned(torch.device("cpu")) == "none (device is cpu)"


def test_needs_hopper_and_cuda_12_3(monkeypatch):
    reason = dl._reason_not.__wrapped__  # uncached
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert reason(0) is None
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    assert "CUDA 12.3" in reason(0) and "12.1" in reason(0)
    monkeypatch.setattr(torch.version, "cuda", "12.10")  # numeric, not string, order
    assert reason(0) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 6))
    assert "compute capability 9.0" in reason(0)
