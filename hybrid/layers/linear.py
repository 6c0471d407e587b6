"""The projection layer every model block uses: `nn.Linear` without a bias whose one-row calls
captured into a CUDA graph (a batch-1 decode step's matrix-vector products) run the Triton
kernel of `small_batch_linear`; everything else is `F.linear`, as before."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from hybrid.kernels.small_batch_linear import small_batch_linear


class Linear(nn.Linear):
    """nn.Linear(in_features, out_features, bias=False): same parameter, same state dict."""

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return small_batch_linear(x, self.weight)
