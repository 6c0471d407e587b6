"""Device resolution and the current-device guard (faked CUDA: these run without a GPU)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from hybrid.devices import on_device, on_input_device, resolve_device, visible_devices_for


def test_the_default_device_is_cuda_when_there_is_one_and_a_named_one_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda:1': no CUDA device is visible; allowed: cpu"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="'gpu' is invalid; allowed: cpu, cuda, cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"allowed: cpu, cuda, cuda:0\.\.cuda:1"):
        resolve_device("cuda:2")


@pytest.fixture
def current_devices(monkeypatch) -> list:
    """The devices `torch.cuda.device` has made current, innermost last (a fake: no GPU)."""
    entered = []

    @contextlib.contextmanager
    def current(device):
        entered.append(device)
        yield
        entered.pop()

    monkeypatch.setattr(torch.cuda, "device", current)
    return entered


def test_the_guard_makes_a_cuda_device_current_and_leaves_the_cpu_alone(current_devices):
    with on_device(torch.device("cpu")):
        assert current_devices == []
    with on_device(torch.device("cuda:1")):
        assert current_devices == [torch.device("cuda:1")]
    assert current_devices == []


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


def test_a_kernel_entry_point_runs_on_its_first_argument_s_device(current_devices):
    current_at_launch = []

    @on_input_device
    def launch(x, scale, *, shift=0):
        """Doc kept."""
        current_at_launch.append(list(current_devices))
        return scale * 2 + shift

    assert launch(SimpleNamespace(device=torch.device("cuda:1")), 3, shift=1) == 7
    assert launch(torch.ones(1), 3) == 6
    assert current_at_launch == [[torch.device("cuda:1")], []]  # the CPU makes nothing current
    assert current_devices == [] and launch.__doc__ == "Doc kept."
