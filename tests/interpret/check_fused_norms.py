"""Run under TRITON_INTERPRET=1 (by tests/test_triton_prefill.py): the fused RMSNorm, grouped
gated RMSNorm (pre- and post-gate, with and without weight) and SwiGLU kernels against the
PyTorch functions, forward and every gradient, float32, fresh random inputs; the norms'
forward with 16 rows a program and with 2 (`forward_rows`: what a batch-1 prefill's
few rows get), 37 rows leaving a last program short."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import interpreted_verdict, rel_err

import hybrid.kernels.fused_norms as fn
from hybrid.kernels.fused_norms import fused_add_rms_norm, fused_gated_rms_norm, fused_swiglu
from hybrid.kernels.norms import gated_rms_norm, rms_norm

TOLERANCE = 1e-5
FP16_ROUNDING = 2**-10  # float16's relative rounding step


def _compare(name: str, fused, reference, *inputs) -> float:
    """Outputs (one tensor or a tuple) and every input gradient, through random probes."""
    mine = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs, expected = fused(*mine), reference(*ref)
    outs, expected = (outs, expected) if isinstance(outs, tuple) else ((outs,), (expected,))
    probes = [torch.randn_like(e, dtype=torch.float32) for e in expected]
    sum((o.float() * p).sum() for o, p in zip(outs, probes, strict=True)).backward()
    sum((e.float() * p).sum() for e, p in zip(expected, probes, strict=True)).backward()
    errors = [max(rel_err(o, e) for o, e in zip(outs, expected, strict=True))]
    errors += [
        rel_err(a.grad, b.grad) for a, b in zip(mine, ref, strict=True) if b.grad is not None
    ]
    print(f"{name}: out {errors[0]:.1e}, {len(errors) - 1} grads, worst {max(errors):.1e}")
    return max(errors)


def check_norms() -> float:
    """Every norm form against PyTorch; the worst error over its bound times TOLERANCE."""
    worst = 0.0
    x = torch.randn(37, 48, requires_grad=True)
    z = torch.randn(37, 48, requires_grad=True)
    w = (1 + 0.2 * torch.randn(48)).requires_grad_()
    worst = max(worst, _compare("rms_norm", lambda x, w: fused_gated_rms_norm(x, None, w, 1e-5, 48),
                                lambda x, w: rms_norm(x, w, 1e-5), x, w))  # fmt: skip
    for before in (True, False):
        worst = max(worst, _compare(
            f"gated norm before_gate={before}",
            lambda x, z, w, b=before: fused_gated_rms_norm(x, z, w, 1e-5, 16, b),
            lambda x, z, w, b=before: gated_rms_norm(x, z, w, 1e-5, 16, b),
            x, z, w,
        ))  # fmt: skip
        worst = max(worst, _compare(
            f"gated norm before_gate={before}, no weight",
            lambda x, z, b=before: fused_gated_rms_norm(x, z, None, 1e-5, 16, b),
            lambda x, z, b=before: gated_rms_norm(x, z, None, 1e-5, 16, b),
            x, z,
        ))  # fmt: skip
    # the pre-norm residual add, float32 and a float16 block output into a float32 stream,
    # and the norm written in float16 as under autocast (its gradient then arrives in float16;
    # δ's gradient and that output are rounded to float16 on both sides: judged against that)
    cases = ((torch.float32, None, TOLERANCE), (torch.float16, None, FP16_ROUNDING),
             (torch.float16, torch.float16, FP16_ROUNDING))  # fmt: skip
    for dtype, out_dtype, bound in cases:
        delta = torch.randn(37, 48).to(dtype).requires_grad_()
        error = _compare(
            f"add + rms_norm, δ {dtype}, out {out_dtype}",
            lambda x, d, w, o=out_dtype: fused_add_rms_norm(x, d, w, 1e-5, o),
            lambda x, d, w, o=out_dtype: (x + d, rms_norm(x + d, w, 1e-5).to(o or x.dtype)),
            x, delta, w,
        )  # fmt: skip
        worst = max(worst, error * TOLERANCE / bound)
    return worst


def main() -> int:
    worst = 0.0
    for programs in (2, 32):  # one "SM" here: 16 rows a program, then 2
        fn.PROGRAMS_PER_SM = programs
        print(f"forward rows a program: {fn.forward_rows(37, torch.device('cpu'))}")
        worst = max(worst, check_norms())
    h = torch.randn(5, 7, 2 * 24, requires_grad=True)
    worst = max(worst, _compare("swiglu", fused_swiglu,
                                lambda h: F.silu(h[..., :24]) * h[..., 24:], h))  # fmt: skip
    return interpreted_verdict(worst, TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
