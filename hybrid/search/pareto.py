"""Non-dominated sorting and hypervolume, on objectives oriented for minimisation."""

from __future__ import annotations

from collections.abc import Sequence

Point = Sequence[float]


def to_minimisation(values: Point, directions: Sequence[str]) -> tuple[float, ...]:
    """Flip maximised objectives so that smaller is always better."""
    return tuple(v if d == "minimize" else -v for v, d in zip(values, directions, strict=True))


def dominates(a: Point, b: Point) -> bool:
    """a is no worse than b everywhere and better somewhere (minimisation)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def pareto_ranks(points: Sequence[Point]) -> list[int]:
    """Rank 0 is the non-dominated front, rank 1 the front once rank 0 is removed, ..."""
    ranks = [-1] * len(points)
    remaining = set(range(len(points)))
    rank = 0
    while remaining:
        front = {
            i
            for i in remaining
            if not any(dominates(points[j], points[i]) for j in remaining if j != i)
        }
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume dominated by `points` and bounded by `reference` (minimisation). Points that do
    not strictly dominate the reference add nothing. Exact, by slicing along the last axis."""
    inside = [tuple(p) for p in points if all(x < r for x, r in zip(p, reference, strict=True))]
    if not inside:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in inside)
    inside.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(inside):
        upper = inside[i + 1][-1] if i + 1 < len(inside) else reference[-1]
        if upper > point[-1]:
            slab = [p[:-1] for p in inside[: i + 1]]
            volume += (upper - point[-1]) * hypervolume(slab, reference[:-1])
    return volume
