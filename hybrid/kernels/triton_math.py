"""Element-wise pieces of MAMBA3.md §2 as Triton device functions, shared by the decode step,
the prefill coefficients and the angle sums so that each definition lives once (the PyTorch
forms are in `mamba3_common`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def wrap_angle(phi):
    """Reduce to [0, 2π): the same rotation, without float32 drift over long sequences."""
    return phi - 6.283185307179586 * tl.floor(phi / 6.283185307179586)


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
