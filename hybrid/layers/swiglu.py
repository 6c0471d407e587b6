"""SwiGLU MLP: w_out(silu(x W_gate) ⊙ x W_up), gate and up fused into one matmul."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybrid.errors import invalid
from hybrid.kernels.small_batch_linear import swiglu_linear
from hybrid.layers.linear import Linear
from hybrid.layers.registry import Layer, register


@dataclass(frozen=True)
class SwiGLUConfig:
    """hidden: inner width; None takes 8/3·d_model rounded up to a multiple of 64."""

    hidden: int | None = None

    def validate(self, d_model: int) -> None:
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 1):
            raise invalid(
                "swiglu.hidden", self.hidden, "a positive integer, or null for 8/3·d_model"
            )

    def hidden_size(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        return -(-(8 * d_model) // (3 * 64)) * 64


@register("swiglu", symbol="-", config=SwiGLUConfig)
class SwiGLU(Layer):
    is_mixer = False

    def __init__(self, d_model: int, config: SwiGLUConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.hidden = config.hidden_size(d_model)
        self.w_in = Linear(d_model, 2 * self.hidden, device=device, dtype=dtype)
        self.w_out = Linear(self.hidden, d_model, device=device, dtype=dtype)
        self.w_out.is_residual_out = True

    def forward(self, x: Tensor, cache: None = None) -> Tensor:
        return self.step_projected(self.w_in(x))

    def step_projection(self) -> Linear:
        return self.w_in

    def step_projected(self, projected: Tensor, cache: None = None) -> Tensor:
        return swiglu_linear(projected, self.w_out.weight)

    def flops_per_token(self, seq_len: int) -> int:
        return 2 * 3 * self.w_in.in_features * self.hidden

    def state_bytes(self, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return 0
