"""The CuTe DSL decode kernel on a GPU (marker `gpu`; skipped without CUDA or without
nvidia-cutlass-dsl) against the float64 oracle (`mamba3_reference_step` on float64 copies).

Tolerances: with an fp32 state every quantity is computed in fp32 from the same inputs, so
one step's relative error is a few ulps of fp32 accumulated over N-term dot products (≈1e-6;
bound 1e-5, the Triton kernel's). A bf16 state is rounded to 8 mantissa bits when stored
(relative 2⁻⁹ ≈ 2e-3 per element), and y reads the fp32 value before rounding: state error
≈4e-3 (bound 1e-2), output error bound 1e-5 as for fp32 (the rounding only reaches the next
step). Over 64 steps the state decays (α < 1), so errors must not grow geometrically: each
step's rounding adds an independent error, a random walk that grows as √t (√(64/8) ≈ 2.8×
from step 8 to 64, measured 2.6e-7 → 7.5e-7), so the error at step 64 must stay within 4×
that at step 8, with a floor of 1e-6 (~16 fp32 ulps) below which the ratio is noise; an
unstable update grows geometrically and fails it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    angle_err,
    projection_slices,
    random_inputs,
    random_state,
    random_weights,
    rel_err,
)

from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3State
from hybrid.kernels.mamba3_step_cute import cute_available, mamba3_step_cute, supports
from hybrid.kernels.reference import mamba3_reference_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cute_available(), reason="nvidia-cutlass-dsl not installed"),
]
CUDA = torch.device("cuda")
STATE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _problem(batch, headdim, d_state, rank, rotation, norm, state_dtype, *, heads=4, groups=1,
             steps=1, dtype=torch.float32, activation="heavy_tail"):  # fmt: skip
    angles = d_state // 4
    inputs = random_inputs(batch=batch, length=steps, heads=heads, headdim=headdim,
                           d_state=d_state, rank=rank, groups=groups, angles=angles)  # fmt: skip
    weights = random_weights(heads=heads, headdim=headdim, d_state=d_state, rank=rank,
                             mimo=rank > 1, out_norm=norm)  # fmt: skip
    state = random_state(batch=batch, heads=heads, headdim=headdim, d_state=d_state,
                         rank=rank, angles=angles)  # fmt: skip
    state.ssm = state.ssm.to(state_dtype).double()  # the oracle starts from the stored state
    options = Mamba3Options(rotation=rotation, a_activation=activation)
    return inputs, weights, state, options


def _on_gpu(obj, dtype):
    return type(obj)(*(None if t is None else t.to(CUDA, dtype).contiguous() for t in obj))


def _gpu_state(state: Mamba3State, state_dtype, dtype) -> Mamba3State:
    return Mamba3State(
        angle=state.angle.to(CUDA, torch.float32),
        ssm=state.ssm.to(CUDA, state_dtype),
        k=state.k.to(CUDA, dtype),
        x=state.x.to(CUDA, dtype),
        gamma=state.gamma.to(CUDA, torch.float32),
    )


def _errors(out, mine: Mamba3State, expected, exact: Mamba3State) -> dict[str, float]:
    return {
        "out": rel_err(out.cpu(), expected),
        "ssm": rel_err(mine.ssm.cpu(), exact.ssm),
        "k": rel_err(mine.k.cpu(), exact.k),
        "x": rel_err(mine.x.cpu(), exact.x),
        "gamma": rel_err(mine.gamma.cpu(), exact.gamma),
        "angle": angle_err(mine.angle.cpu(), exact.angle) if exact.angle.numel() else 0.0,
    }


# headdim, d_state, rank, rotation, norm. The first four get the occupancy hint (64 registers
# a thread), the rest not; P128 N64 R8 fp32 reduces y in two rank chunks.
SHAPES = [
    (64, 128, 1, "pairwise", False),
    (64, 128, 4, "halves", True),
    (32, 32, 2, "pairwise", True),
    (48, 64, 1, "halves", True),
    (48, 96, 4, "pairwise", False),
    (128, 256, 8, "halves", True),
    (128, 64, 8, "pairwise", False),
    (64, 256, 2, "halves", False),
    (48, 64, 3, "halves", True),  # a rank that is not a power of two
]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 130])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}-N{}-R{}-{}-norm{}".format(*s))
def test_one_step_matches_the_oracle(shape, batch, state_dtype):
    inputs, weights, state, options = _problem(batch, *shape, state_dtype)
    token = Mamba3Inputs(*(t[:, 0] for t in inputs))
    expected, exact = mamba3_reference_step(token, weights, options, state)
    mine = _gpu_state(state, state_dtype, torch.float32)
    gpu_token = _on_gpu(token, torch.float32)
    if batch > 3:  # as a model passes them: column slices of one buffer, read in place
        slices = projection_slices(_on_gpu(inputs, torch.float32))[0]
        gpu_token = Mamba3Inputs(*(t[:, 0] for t in slices))
    assert supports(gpu_token, mine)
    out = mamba3_step_cute(gpu_token, _on_gpu(weights, torch.float32), options, mine)
    errors = _errors(out, mine, expected, exact)
    assert errors["out"] <= 1e-5 and errors["k"] <= 1e-5 and errors["x"] <= 1e-7, errors
    assert errors["ssm"] <= STATE_TOL[state_dtype] and errors["angle"] <= 1e-5, errors
    assert errors["gamma"] <= 1e-6, errors


@pytest.mark.parametrize(
    ("activation", "groups", "dtype"),
    [("softplus", 2, torch.bfloat16), ("heavy_tail", 4, torch.float16)],
)
def test_options_and_half_inputs(activation, groups, dtype):
    """Softplus A, several B/C groups, bf16/fp16 token inputs (the oracle sees the same
    rounded values; bound: the inputs' own rounding no longer matters, fp32 arithmetic)."""
    inputs, weights, state, options = _problem(
        5, 64, 128, 2, "halves", True, torch.float32, heads=8, groups=groups,
        activation=activation,
    )  # fmt: skip
    token = Mamba3Inputs(*(t[:, 0].to(dtype).double() for t in inputs))
    state.k, state.x = state.k.to(dtype).double(), state.x.to(dtype).double()
    expected, exact = mamba3_reference_step(token, weights, options, state)
    mine = _gpu_state(state, torch.float32, dtype)
    out = mamba3_step_cute(_on_gpu(token, dtype), _on_gpu(weights, torch.float32), options, mine)
    assert rel_err(out.cpu(), expected) <= 1e-2  # o rounded to the token dtype
    assert rel_err(mine.ssm.cpu(), exact.ssm) <= 1e-5


@pytest.mark.parametrize("headdim", [48, 64])
def test_no_write_outside_the_state(headdim):
    """The state lives inside a NaN-filled buffer (16-byte aligned): margins stay NaN, and
    NaN-poisoned output memory is fully overwritten."""
    inputs, weights, state, options = _problem(3, headdim, 64, 2, "pairwise", True, torch.float32)
    token = Mamba3Inputs(*(t[:, 0] for t in inputs))
    expected, exact = mamba3_reference_step(token, weights, options, state)
    mine = _gpu_state(state, torch.float32, torch.float32)
    margin = 64
    buffer = torch.full((mine.ssm.numel() + 2 * margin,), float("nan"), device=CUDA)
    buffer[margin:-margin] = mine.ssm.flatten()
    mine.ssm = buffer[margin:-margin].view_as(mine.ssm)
    out = mamba3_step_cute(_on_gpu(token, torch.float32), _on_gpu(weights, torch.float32),
                           options, mine)  # fmt: skip
    assert buffer[:margin].isnan().all() and buffer[-margin:].isnan().all()
    assert torch.isfinite(out).all() and rel_err(out.cpu(), expected) <= 1e-5
    assert rel_err(mine.ssm.cpu(), exact.ssm) <= 1e-5


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rank", "rotation"), [(1, "pairwise"), (4, "halves")])
def test_64_steps_errors_do_not_grow(rank, rotation, state_dtype):
    inputs, weights, exact, options = _problem(
        2, 64, 64, rank, rotation, True, torch.float32, steps=64
    )
    mine = _gpu_state(exact, state_dtype, torch.float32)
    gpu_weights = _on_gpu(weights, torch.float32)
    worst = []
    for t in range(64):
        token = Mamba3Inputs(*(f[:, t] for f in inputs))
        expected, exact = mamba3_reference_step(token, weights, options, exact)
        out = mamba3_step_cute(_on_gpu(token, torch.float32), gpu_weights, options, mine)
        worst.append(max(rel_err(out.cpu(), expected), rel_err(mine.ssm.cpu(), exact.ssm)))
    assert max(worst) <= STATE_TOL[state_dtype] * 2, worst
    assert worst[63] <= 4 * max(worst[7], 1e-6), (worst[7], worst[63])


def test_cuda_graph_replay():
    """Captured once, replayed: each replay advances the state exactly like an eager call."""
    inputs, weights, state, options = _problem(4, 64, 128, 2, "halves", True, torch.float32,
                                               steps=3)  # fmt: skip
    gpu_weights = _on_gpu(weights, torch.float32)
    eager = _gpu_state(state, torch.float32, torch.float32)
    graphed = _gpu_state(state, torch.float32, torch.float32)
    token = _on_gpu(Mamba3Inputs(*(f[:, 0] for f in inputs)), torch.float32)
    mamba3_step_cute(token, gpu_weights, options, _gpu_state(state, torch.float32, torch.float32))
    torch.cuda.synchronize()  # compiled and loaded before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mamba3_step_cute(token, gpu_weights, options, graphed)
    for t in range(3):
        fresh = _on_gpu(Mamba3Inputs(*(f[:, t] for f in inputs)), torch.float32)
        for mine, new in zip(token, fresh, strict=True):
            mine.copy_(new)
        graph.replay()
        expected = mamba3_step_cute(fresh, gpu_weights, options, eager)
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        assert torch.equal(graphed.ssm, eager.ssm) and torch.equal(graphed.k, eager.k)
