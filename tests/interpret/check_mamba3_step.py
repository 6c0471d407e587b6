"""Run under TRITON_INTERPRET=1 (by tests/test_triton_step.py): the Triton decode kernel
against the oracle's token update, fp32, fresh random inputs — one step per option case, and
64-step rollouts against the oracle in float64; prints one error line per case and exits
non-zero past the tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import (
    interpreted_verdict,
    projection_slices,
    random_inputs,
    random_state,
    random_weights,
    rel_err,
)

from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3State
from hybrid.kernels.mamba3_step_triton import mamba3_step_triton
from hybrid.kernels.reference import mamba3_reference_step

CASES = [  # rank, rotation, pre-gate norm, A activation, groups, angles, headdim, d_state
    (1, "pairwise", False, "heavy_tail", 2, 4, 8, 16),
    (2, "halves", True, "softplus", 1, 4, 8, 16),
    (4, "halves", False, "heavy_tail", 2, 8, 16, 32),
    (4, "pairwise", True, "heavy_tail", 4, 8, 8, 16),
    (8, "halves", True, "heavy_tail", 1, 2, 4, 8),
    (1, "halves", True, "heavy_tail", 1, 0, 8, 16),
]
TOLERANCE = 1e-5


def check_rollout(rank: int, rotation: str, steps: int = 64) -> float:
    """`steps` consecutive kernel steps (fp32 state) against the oracle's steps in float64 on
    the same inputs: the worst relative error of the output and the state over the run."""
    heads, p, n, angles = 2, 8, 16, 4
    inputs = random_inputs(batch=2, length=steps, heads=heads, headdim=p, d_state=n,
                           rank=rank, groups=1, angles=angles)  # fmt: skip
    weights = random_weights(heads=heads, headdim=p, d_state=n, rank=rank, mimo=rank > 1,
                             out_norm=True)  # fmt: skip
    options = Mamba3Options(rotation=rotation)
    exact = random_state(batch=2, heads=heads, headdim=p, d_state=n, rank=rank, angles=angles)
    mine = Mamba3State(*(t.float().clone() for t in exact.tensors()))
    weights32 = type(weights)(*(None if w is None else w.float() for w in weights))
    worst = []
    for t in range(steps):
        token = Mamba3Inputs(*(field[:, t] for field in inputs))
        expected, exact = mamba3_reference_step(token, weights, options, exact)
        token32 = Mamba3Inputs(*(field.float().contiguous() for field in token))
        out = mamba3_step_triton(token32, weights32, options, mine)
        worst.append(max(rel_err(out, expected), rel_err(mine.ssm, exact.ssm),
                         rel_err(mine.gamma, exact.gamma)))  # fmt: skip
    print(f"rollout R={rank} {rotation}: {steps} steps, error at steps 1/16/64 "
          f"{worst[0]:.1e}/{worst[15]:.1e}/{worst[-1]:.1e}, worst {max(worst):.1e}")  # fmt: skip
    return max(worst)


def main() -> int:
    worst = max(check_rollout(1, "pairwise"), check_rollout(4, "halves"))
    for case, (rank, rotation, norm, activation, groups, angles, p, n) in enumerate(CASES):
        inputs = random_inputs(
            batch=3,
            length=1,
            heads=4,
            headdim=p,
            d_state=n,
            rank=rank,
            groups=groups,
            angles=angles,
            dtype=torch.float32,
        )
        if case % 2:  # column slices of one buffer, read through their row strides
            inputs = projection_slices(inputs)[0]
        token = Mamba3Inputs(*(t[:, 0] for t in inputs))  # views, as the layer passes them
        weights = random_weights(
            heads=4,
            headdim=p,
            d_state=n,
            rank=rank,
            mimo=rank > 1,
            out_norm=norm,
            dtype=torch.float32,
        )
        state = random_state(
            batch=3, heads=4, headdim=p, d_state=n, rank=rank, angles=angles, dtype=torch.float32
        )
        options = Mamba3Options(rotation=rotation, a_activation=activation)
        expected, expected_state = mamba3_reference_step(token, weights, options, state)
        mine = Mamba3State(*(t.clone() for t in state.tensors()))
        out = mamba3_step_triton(token, weights, options, mine)
        errors = [
            rel_err(out, expected),
            rel_err(mine.ssm, expected_state.ssm),
            rel_err(mine.k, expected_state.k) if angles else 0.0,
            rel_err(mine.x, expected_state.x),
            rel_err(mine.gamma, expected_state.gamma),
        ]
        if angles:
            gap = torch.remainder(mine.angle - expected_state.angle + torch.pi, 2 * torch.pi)
            errors.append((gap - torch.pi).abs().max().item())
        worst = max(worst, *errors)
        print(
            f"{'sliced' if case % 2 else 'dense '} R={rank} {rotation:<8} norm={norm!s:<5} "
            f"{activation:<10} G={groups} S={angles} P={p} N={n}: "
            + " ".join(f"{e:.1e}" for e in errors)
        )
    return interpreted_verdict(worst, TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
