"""Device resolution and the current-device guard (faked CUDA: these run without a GPU)."""

from __future__ import annotations

import contextlib

import torch

from hybrid.devices import on_device, resolve_device


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
