"""The Triton decode kernel, run by Triton's interpreter on the CPU (a subprocess: the
interpreter is chosen when kernels are defined) and compared with the oracle: one step for
every option, and 64 consecutive steps (errors must stay at fp32 noise)."""

from __future__ import annotations

import pytest
import torch
from helpers import run_interpreted

from hybrid.kernels.mamba3_decode import decode_backend


def test_kernel_matches_the_oracle_under_the_interpreter():
    stdout = run_interpreted("check_mamba3_step.py")
    assert stdout.count("rollout") == 2 and stdout.count("R=") == 8 and "worst" in stdout


def test_dispatch_keeps_the_cpu_on_the_torch_path():
    from helpers import random_inputs, random_state

    from hybrid.kernels.mamba3_common import Mamba3Inputs

    token = Mamba3Inputs(*(t[:, 0] for t in random_inputs(length=1, dtype=torch.float32)))
    state = random_state(dtype=torch.float32)
    assert decode_backend(token, state) == "torch"
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*allowed"):
        decode_backend(token, state, "triton")
