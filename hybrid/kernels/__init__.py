"""Compute entry points, one per op; each picks its backend by device (kernels/ knows
nothing about layers). Today every op runs its PyTorch path; the Triton prefill and the
CuTe DSL decode kernels plug in here."""

from hybrid.kernels.mamba3_decode import mamba3_step
from hybrid.kernels.mamba3_scan import mamba3_scan

__all__ = ["mamba3_scan", "mamba3_step"]
