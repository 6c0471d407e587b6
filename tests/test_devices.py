"""Device resolution and the current-device guard (faked CUDA: these run without a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from hybrid.devices import on_device, resolve_device, visible_devices_for


def test_the_default_device_is_cuda_when_there_is_one(monkeypatch):
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


def test_the_guard_makes_a_cuda_device_current_and_leaves_the_cpu_alone(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def current(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", current)
    with on_device(torch.device("cpu")):
        pass
    with on_device(torch.device("cuda:1")):
        assert entered == [torch.device("cuda:1")]
    assert entered == [torch.device("cuda:1")]


def test_pinning_goes_through_an_inherited_visible_device_list(monkeypatch):
    """Under Slurm CUDA_VISIBLE_DEVICES lists the job's GPUs: id 1 is the job's second GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices_for(3) == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert [visible_devices_for(g) for g in (0, 1)] == ["4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1f,GPU-77c2")
    assert visible_devices_for(1) == "GPU-77c2"
    with pytest.raises(ValueError, match=r"GPU id 2 is not visible .*allowed ids: 0\.\.1"):
        visible_devices_for(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="allowed ids: none: no GPU is visible"):
        visible_devices_for(0)
