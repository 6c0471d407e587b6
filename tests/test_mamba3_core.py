"""The chunked Mamba-3 core against the token-by-token oracle, and the oracle against the
recurrence written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import angle_err, random_inputs, random_state, random_weights, rel_err

from hybrid.kernels.chunked import mamba3_chunked
from hybrid.kernels.mamba3_common import (
    Mamba3Inputs,
    Mamba3Options,
    Mamba3Weights,
)
from hybrid.kernels.reference import mamba3_reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
CASES = [  # (rank, rotation, pre-gate norm)
    (1, "pairwise", False),
    (1, "halves", True),
    (2, "halves", False),
    (2, "pairwise", True),
    (4, "halves", True),
    (4, "pairwise", False),
]


def _problem(rank, norm, dtype, length=29, requires_grad=False):
    inputs = random_inputs(length=length, rank=rank, dtype=dtype, requires_grad=requires_grad)
    weights = random_weights(
        rank=rank, mimo=rank > 1, out_norm=norm, dtype=dtype, requires_grad=requires_grad
    )
    return inputs, weights


def _assert_states_close(actual, expected, tol):
    assert rel_err(actual.ssm, expected.ssm) <= tol
    assert rel_err(actual.k, expected.k) <= tol
    assert rel_err(actual.x, expected.x) <= tol
    assert rel_err(actual.gamma, expected.gamma) <= tol
    assert angle_err(actual.angle, expected.angle) <= 10 * tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rank", "rotation", "norm"), CASES)
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunked_matches_reference(rank, rotation, norm, dtype, chunk_size):
    inputs, weights = _problem(rank, norm, dtype)
    options = Mamba3Options(rotation=rotation)
    state = random_state(rank=rank, dtype=dtype)
    expected, expected_state = mamba3_reference(inputs, weights, options, state)
    actual, actual_state = mamba3_chunked(inputs, weights, options, state, chunk_size)
    assert rel_err(actual, expected) <= TOLERANCE[dtype]
    _assert_states_close(actual_state, expected_state, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rank", "rotation", "norm"), CASES)
def test_state_passing_split_equals_one_call(rank, rotation, norm, dtype):
    """Two chunked calls with the state passed equal one reference call over the whole."""
    inputs, weights = _problem(rank, norm, dtype, length=37)
    options = Mamba3Options(rotation=rotation)
    state = random_state(rank=rank, dtype=dtype)
    expected, expected_state = mamba3_reference(inputs, weights, options, state)
    split = 13
    head = Mamba3Inputs(*(t[:, :split] for t in inputs))
    tail = Mamba3Inputs(*(t[:, split:] for t in inputs))
    first, mid_state = mamba3_chunked(
        inputs=head, weights=weights, options=options, state=state, chunk_size=8
    )
    second, final_state = mamba3_chunked(tail, weights, options, mid_state, chunk_size=8)
    assert rel_err(torch.cat((first, second), dim=1), expected) <= TOLERANCE[dtype]
    _assert_states_close(final_state, expected_state, TOLERANCE[dtype])


@pytest.mark.parametrize(("rank", "rotation", "norm"), [CASES[0], CASES[3], CASES[4]])
def test_chunked_gradients_match_reference(rank, rotation, norm):
    inputs, weights = _problem(rank, norm, torch.float64, length=19, requires_grad=True)
    options = Mamba3Options(rotation=rotation)
    state = random_state(rank=rank)
    for t in state.tensors():
        t.requires_grad_(True)
    leaves = [t for t in (*inputs, *weights, *state.tensors()) if t is not None]
    probe = torch.randn(inputs.x.shape, dtype=torch.float64)
    probe_state = torch.randn(state.ssm.shape, dtype=torch.float64)

    def grads(fn, **kw):
        out, final = fn(inputs, weights, options, state, **kw)
        loss = (out * probe).sum() + (final.ssm * probe_state).sum()
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    expected = grads(mamba3_reference)
    actual = grads(mamba3_chunked, chunk_size=8)
    checked = 0
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            continue
        assert rel_err(a, e) <= 1e-10
        checked += 1
    assert checked >= 15


def test_mimo_rank_one_with_unit_projections_equals_siso():
    inputs, weights = _problem(1, True, torch.float64)
    ones = torch.ones(4, 1, 8, dtype=torch.float64)
    mimo = weights._replace(mimo_x=ones, mimo_z=ones, mimo_o=ones)
    for rotation in ("pairwise", "halves"):
        options = Mamba3Options(rotation=rotation)
        siso, siso_state = mamba3_chunked(inputs, weights, options, chunk_size=8)
        as_mimo, mimo_state = mamba3_chunked(inputs, mimo, options, chunk_size=8)
        assert rel_err(as_mimo, siso) <= 1e-12
        assert rel_err(mimo_state.ssm, siso_state.ssm) <= 1e-12


def test_pregate_norm_changes_the_output():
    """The norm option is live on both paths (so the on/off cases above test different maps)."""
    inputs, weights = _problem(2, True, torch.float64)
    options = Mamba3Options(rotation="halves")
    with_norm, _ = mamba3_chunked(inputs, weights, options, chunk_size=8)
    without, _ = mamba3_chunked(inputs, weights._replace(out_norm=None), options, chunk_size=8)
    assert rel_err(with_norm, without) > 1e-2


def test_reference_two_tokens_by_hand():
    """The oracle against MAMBA3.md §2 written out for one head, two tokens, SISO, no rotation
    past S=1 and every coefficient computed explicitly."""
    torch.manual_seed(0)
    n, p = 4, 3
    x = torch.randn(1, 2, 1, p, dtype=torch.float64)
    z = torch.randn(1, 2, 1, p, dtype=torch.float64)
    b = torch.randn(1, 2, 1, 1, n, dtype=torch.float64)
    c = torch.randn(1, 2, 1, 1, n, dtype=torch.float64)
    dt, a, trap = (torch.randn(1, 2, 1, dtype=torch.float64) for _ in range(3))
    angle = torch.randn(1, 2, 1, dtype=torch.float64)
    weights = Mamba3Weights(
        dt_bias=torch.tensor([0.3], dtype=torch.float64),
        b_norm=torch.rand(n, dtype=torch.float64) + 0.5,
        c_norm=torch.rand(n, dtype=torch.float64) + 0.5,
        b_bias=torch.randn(1, 1, n, dtype=torch.float64),
        c_bias=torch.randn(1, 1, n, dtype=torch.float64),
        d=torch.tensor([0.7], dtype=torch.float64),
    )
    out, state = mamba3_reference(
        Mamba3Inputs(x, z, b, c, dt, a, trap, angle), weights, Mamba3Options()
    )

    def rms(v, w):
        return v / torch.sqrt((v * v).mean() + 1e-5) * w

    hstate = torch.zeros(p, n, dtype=torch.float64)
    phi = 0.0
    prev_x = torch.zeros(p, dtype=torch.float64)
    prev_k = torch.zeros(n, dtype=torch.float64)
    for t in range(2):
        delta = F.softplus(dt[0, t, 0] + 0.3)
        u = a[0, t, 0]
        big_a = -max(float(1 + u) if u >= 0 else float(1 / (1 - u)), 1e-4)
        lam = torch.sigmoid(trap[0, t, 0])
        alpha = torch.exp(delta * big_a)
        beta, gamma = (1 - lam) * delta * alpha, lam * delta
        phi = phi + delta * math.pi * torch.tanh(angle[0, t, 0])
        rot = torch.eye(n, dtype=torch.float64)
        rot[0, 0], rot[0, 1] = torch.cos(phi), -torch.sin(phi)
        rot[1, 0], rot[1, 1] = torch.sin(phi), torch.cos(phi)
        k = rot @ (rms(b[0, t, 0, 0], weights.b_norm) + weights.b_bias[0, 0])
        q = rot @ (rms(c[0, t, 0, 0], weights.c_norm) + weights.c_bias[0, 0])
        xt = x[0, t, 0]
        hstate = alpha * hstate + beta * torch.outer(prev_x, prev_k) + gamma * torch.outer(xt, k)
        y = hstate @ q + 0.7 * xt
        expected = y * F.silu(z[0, t, 0])
        assert rel_err(out[0, t, 0], expected) <= 1e-12
        prev_x, prev_k, prev_gamma = xt, k, gamma
    # the cache holds H⁻ = H − γ x kᵀ of the last token, and full_ssm rebuilds H
    assert rel_err(state.ssm[0, 0], hstate - prev_gamma * torch.outer(prev_x, prev_k)) <= 1e-12
    assert rel_err(state.full_ssm(None)[0, 0], hstate) <= 1e-12
    assert abs(state.gamma[0, 0].item() - prev_gamma.item()) <= 1e-15
    assert rel_err(state.k[0, 0, 0], prev_k) <= 1e-12
