"""Non-dominated sorting and hypervolume against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from hybrid.search.pareto import dominates, hypervolume, pareto_ranks, to_minimisation


def test_ranks_match_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        points = [(rng.randint(0, 9), rng.randint(0, 9), rng.random()) for _ in range(25)]
        ranks = pareto_ranks(points)
        front = [p for p in points if not any(dominates(q, p) for q in points)]
        assert sorted(p for p, r in zip(points, ranks, strict=True) if r == 0) == sorted(front)
        for p, rp in zip(points, ranks, strict=True):  # a dominator always ranks strictly lower
            for q, rq in zip(points, ranks, strict=True):
                if dominates(q, p):
                    assert rq < rp


def test_hypervolume_2d_by_hand():
    # staircase of (1,3), (2,2), (3,1) under reference (4,4): 3 + 2 + 1 = 6
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (4, 4)) == pytest.approx(6.0)
    assert hypervolume([(1, 3), (2, 2), (3, 1), (3, 3)], (4, 4)) == pytest.approx(6.0)
    assert hypervolume([(5, 1)], (4, 4)) == 0.0


def test_hypervolume_3d_matches_a_grid_count():
    rng = random.Random(1)
    points = [tuple(rng.randint(0, 9) for _ in range(3)) for _ in range(12)]
    reference = (10, 10, 10)
    cells = sum(
        any(all(p[i] <= c[i] for i in range(3)) for p in points)
        for c in itertools.product(range(10), repeat=3)
    )
    assert hypervolume(points, reference) == pytest.approx(cells)


def test_maximised_objectives_are_flipped():
    assert to_minimisation((2.0, 3.0), ("minimize", "maximize")) == (2.0, -3.0)
