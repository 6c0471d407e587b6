"""The shared per-token pieces of Mamba-3 against their closed forms (MAMBA3.md §2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from hybrid.kernels.mamba3_common import (
    Mamba3Options,
    Mamba3Weights,
    a_coefficient,
    gate_output,
    n_rope_angles,
    normalize_bc,
    rotate,
)
from hybrid.kernels.norms import gated_rms_norm, rms_norm


def test_heavy_tail_and_softplus_a():
    u = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0], dtype=torch.float64)
    heavy = a_coefficient(u, "heavy_tail", 1e-4)
    assert torch.allclose(heavy, -torch.tensor([1 / 4, 1 / 1.5, 1.0, 1.25, 3.0], dtype=u.dtype))
    soft = a_coefficient(u, "softplus", 1e-4)
    assert torch.allclose(soft, -F.softplus(u))
    floored = a_coefficient(torch.tensor([-50.0]), "softplus", 0.3)
    assert floored.item() == pytest.approx(-0.3)


def test_heavy_tail_gradient_is_finite_everywhere():
    u = torch.tensor([-2.0, 0.0, 1.0, 5.0], requires_grad=True)
    a_coefficient(u, "heavy_tail", 1e-4).sum().backward()
    assert torch.isfinite(u.grad).all()
    assert torch.allclose(u.grad, torch.tensor([-1 / 9, -1.0, -1.0, -1.0]))


def test_n_rope_angles():
    assert n_rope_angles(128, 0.5) == 32
    assert n_rope_angles(128, 1.0) == 64
    assert n_rope_angles(6, 0.5) == 1


@pytest.mark.parametrize("rotation", ["pairwise", "halves"])
def test_rotation_pairs_and_norm(rotation):
    n, s = 8, 2
    v = torch.randn(3, n, dtype=torch.float64)
    phi = torch.rand(3, s, dtype=torch.float64) * 6
    out = rotate(v, phi, rotation)
    pairs = (
        [(2 * i, 2 * i + 1) for i in range(s)]
        if rotation == "pairwise"
        else [(i, i + n // 2) for i in range(s)]
    )
    untouched = set(range(n)) - {d for pair in pairs for d in pair}
    for i, (d0, d1) in enumerate(pairs):
        c, sn = phi[:, i].cos(), phi[:, i].sin()
        assert torch.allclose(out[:, d0], v[:, d0] * c - v[:, d1] * sn)
        assert torch.allclose(out[:, d1], v[:, d0] * sn + v[:, d1] * c)
    for d in untouched:
        assert torch.equal(out[:, d], v[:, d])
    assert torch.allclose(out.norm(dim=-1), v.norm(dim=-1))


def test_conventions_are_permutations_of_each_other():
    n, s = 16, 4
    v = torch.randn(5, n, dtype=torch.float64)
    phi = torch.randn(5, s, dtype=torch.float64)
    # dims (2i, 2i+1) of the pairwise layout are dims (i, i + n/2) of the halves layout
    perm = [None] * n
    for i in range(n // 2):
        perm[i], perm[i + n // 2] = 2 * i, 2 * i + 1
    pairwise = rotate(v, phi, "pairwise")
    halves = rotate(v[:, perm], phi, "halves")
    assert torch.allclose(halves, pairwise[:, perm])


def test_normalize_bc_groups_and_bias():
    v = torch.randn(2, 1, 2, 4, dtype=torch.float64)  # (Bt, R, G, N)
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.randn(4, 1, 4, dtype=torch.float64)  # (H, R, N), 2 heads per group
    out = normalize_bc(v, weight, bias, 1e-5)
    for h in range(4):
        g = h // 2
        expected = v[:, 0, g] / torch.sqrt(v[:, 0, g].pow(2).mean(-1, keepdim=True) + 1e-5)
        assert torch.allclose(out[:, 0, h], expected * weight + bias[h, 0])


def test_rms_norm_and_gated_norms():
    y = torch.randn(3, 12, dtype=torch.float64)
    z = torch.randn(3, 12, dtype=torch.float64)
    w = torch.rand(12, dtype=torch.float64) + 0.5
    expected = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert rel_err(rms_norm(y, w, 1e-6), expected) <= 1e-14
    groups = y.view(3, 3, 4)
    normed = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-6)).view(3, 12)
    pre = gated_rms_norm(y, z, w, 1e-6, group_size=4, norm_before_gate=True)
    assert rel_err(pre, normed * w * F.silu(z)) <= 1e-14
    gated = (y * F.silu(z)).view(3, 3, 4)
    post_expected = (gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-6)).view(3, 12)
    post = gated_rms_norm(y, z, w, 1e-6, group_size=4, norm_before_gate=False)
    assert rel_err(post, post_expected * w) <= 1e-14


def test_gate_output_mimo_sum():
    r, h, p = 3, 2, 4
    y = torch.randn(5, r, h, p, dtype=torch.float64)
    z = torch.randn(5, h, p, dtype=torch.float64)
    mz, mo = torch.randn(h, r, p, dtype=torch.float64), torch.randn(h, r, p, dtype=torch.float64)
    weights = Mamba3Weights(*(None,) * 6, mimo_z=mz, mimo_o=mo)
    out = gate_output(y, z, weights, Mamba3Options())
    expected = sum(mo[:, i] * y[:, i] * F.silu(mz[:, i] * z) for i in range(r))
    assert rel_err(out, expected) <= 1e-14
    assert math.isfinite(out.sum().item())
