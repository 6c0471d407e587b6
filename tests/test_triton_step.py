"""The Triton decode kernel, run by Triton's interpreter on the CPU (a subprocess: the
interpreter is chosen when kernels are defined) and compared with the oracle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from hybrid.kernels.mamba3_decode import decode_backend

SCRIPT = Path(__file__).parent / "interpret" / "check_mamba3_step.py"


def test_kernel_matches_the_oracle_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("R=") == 6 and "worst" in result.stdout


def test_dispatch_keeps_the_cpu_on_the_torch_path():
    from helpers import random_inputs, random_state

    from hybrid.kernels.mamba3_common import Mamba3Inputs

    token = Mamba3Inputs(*(t[:, 0] for t in random_inputs(length=1, dtype=torch.float32)))
    state = random_state(dtype=torch.float32)
    assert decode_backend(token, state) == "torch"
    assert decode_backend(token, state, "triton") == "triton"
