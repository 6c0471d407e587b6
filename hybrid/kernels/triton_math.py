"""Element-wise pieces of MAMBA3.md §2 as Triton device functions, shared by the decode step,
the prefill coefficients and the angle sums so that each definition lives once (the PyTorch
forms are in `mamba3_common`)."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# the interpreter cannot run the hardware approximations: it takes the libm forms
FAST_TRIG = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
# kernels write them right of a tensor (x * PI): Triton 3.6's interpreter cannot apply a
# constexpr's operator to a tensor
PI = tl.constexpr(math.pi)
TWO_PI = tl.constexpr(2 * math.pi)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision: full float32 products for float32 inputs (tests, oracle
    checks); bf16/fp16 use the MMA as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def wrap_angle(phi):
    """Reduce to [0, 2π): the same rotation, without float32 drift over long sequences."""
    return phi - tl.floor(phi / TWO_PI) * TWO_PI


@triton.jit
def centre_angle(phi):
    """Reduce to [−π, π): the same rotation, and a small angle keeps its magnitude (sums of
    such angles stay as exact in float32 as their terms)."""
    return phi - tl.floor(phi / TWO_PI + 0.5) * TWO_PI


@triton.jit
def cos_sin_wrapped(phi):
    """cos φ and sin φ of an angle in [0, 2π) (`wrap_angle`'s range). Compiled kernels use the
    hardware approximations on φ − π, inside [−π, π) where their absolute error is ~1e-6
    (the published Mamba-3 kernels use them too): libm's range reduction took a quarter of
    the B/C rotation backward (H100, 8 × 2048: SISO 0.57 against 0.43 ms, R=4 2.20 against
    1.64 ms)."""
    if FAST_TRIG:
        centred = phi - PI
        return -libdevice.fast_cosf(centred), -libdevice.fast_sinf(centred)
    return tl.cos(phi), tl.sin(phi)


@triton.jit
def a_coefficient(raw, a_floor, HEAVY_TAIL: tl.constexpr):
    """A = −max(f(raw), floor) (f: heavy tail 1+u / 1/(1−u), or softplus) and dA/draw (0
    where the floor binds)."""
    if HEAVY_TAIL:
        neg = 1.0 / (1.0 - tl.minimum(raw, 0.0))
        f = tl.where(raw >= 0, 1.0 + raw, neg)
        df = tl.where(raw >= 0, 1.0, neg * neg)
    else:
        f = softplus(raw)
        df = tl.sigmoid(raw)
    above = f >= a_floor
    return -tl.where(above, f, a_floor), tl.where(above, -df, 0.0)
