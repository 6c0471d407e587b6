"""Run under TRITON_INTERPRET=1 (by tests/test_small_batch_linear.py): the matrix-vector
kernel of `small_batch_linear` against `F.linear` in float64, fresh random inputs, float32
and float16 operands; output widths that are and are not multiples of a program's rows, on
both sides of the BN switch (4 rows a program up to 4,096 features, 16 beyond), input widths
below, at and above one BK step, one and three input rows, an input row read from a wider
tensor (its stride), and an output buffer poisoned with NaN (an unwritten element shows);
each also with SwiGLU's gated input (silu(gate) ⊙ up of a [gate | up] row) and with the
row normalised first (`normed_gemv`: RMSNorm(x + δ)·w, with and without δ, whose sum must
come back exactly and in full) and with the rows gathered from an embedding table
(`embedding_normed_gemv`: the first block's entry, whose rows must come back exactly); all
of it with the first weight step in the loop and, as chained launches of 4-row tiles load
it, before it (PRELOAD)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import interpreted_verdict, poisoned, rel_err

import hybrid.kernels.small_batch_linear as sbl
from hybrid.kernels.norms import rms_norm

TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3}  # fp16: its output rounding
CASES = [  # output features, input features, rows
    (4, 16, 1),
    (37, 50, 1),
    (300, 700, 3),
    (4100, 40, 1),
    (4113, 1030, 1),
]


def normed_error(x: torch.Tensor, weight: torch.Tensor, with_delta: bool) -> float:
    """`normed_gemv`'s relative error against float64 (its sum r = x + δ must be exact)."""
    delta = torch.randn_like(x) if with_delta else None
    scale = 1 + torch.rand(x.shape[-1], dtype=x.dtype)
    eps = 1e-5
    summed, out = sbl.normed_gemv(x, delta, scale, eps, weight)
    r = x if delta is None else (x.double() + delta.double()).to(x.dtype)
    if not torch.equal(summed, r):
        return float("inf")
    return rel_err(out, F.linear(rms_norm(r.double(), scale.double(), eps), weight.double()))


def gathered_error(weight: torch.Tensor, rows: int) -> float:
    """`embedding_normed_gemv`'s relative error against float64 for `rows` tokens of a
    50-row table (the gathered rows must come back exactly)."""
    table = torch.randn(50, weight.shape[1], dtype=weight.dtype)
    tokens = torch.randint(0, 50, (rows,))
    scale = 1 + torch.rand(weight.shape[1], dtype=weight.dtype)
    gathered, out = sbl.embedding_normed_gemv(table, tokens, scale, 1e-5, weight)
    if not torch.equal(gathered, table[tokens]):
        return float("inf")
    normed = rms_norm(gathered.double(), scale.double(), 1e-5)
    return rel_err(out, F.linear(normed, weight.double()))


def main() -> int:
    sbl._new_output = lambda shape, like: poisoned(shape, like.device, like.dtype)
    unchained = sbl._loads_early
    worst = 0.0
    for (dtype, tolerance), (n, k, rows), early in itertools.product(
        TOLERANCE.items(), CASES, (False, True)
    ):
        sbl._loads_early = (lambda pdl, bn: unchained(True, bn)) if early else unchained
        weight = torch.randn(n, k, dtype=dtype) / k**0.5
        wide = torch.randn(rows, 2 * k + 3, dtype=dtype)
        x = wide[:, 3 : k + 3]  # a row stride of 2k + 3 elements
        expected = F.linear(x.double(), weight.double())
        error = rel_err(sbl.gemv(x.unsqueeze(1), weight).squeeze(1), expected)
        print(f"{dtype!s:<14} N={n} K={k} rows={rows} tiling {sbl.tiling(n, k)}"
              f"{' first step early' if early else ''}: {error:.1e}")  # fmt: skip
        worst = max(worst, error / tolerance)
        # SwiGLU's [gate | up] row: silu(gate) ⊙ up, rounded to the dtype, then the product
        h = torch.randn(rows, 2 * k, dtype=dtype)
        gate, up = h.double().chunk(2, dim=-1)
        expected = F.linear((F.silu(gate) * up).to(dtype).double(), weight.double())
        error = rel_err(sbl.gemv(h, weight, gated=True), expected)
        print(f"{'':<14} gated: {error:.1e}")
        worst = max(worst, error / tolerance)
        for with_delta in (False, True):
            error = normed_error(x, weight, with_delta)
            print(f"{'':<14} normed{' x + δ' if with_delta else ''}: {error:.1e}")
            worst = max(worst, error / tolerance)
        error = gathered_error(weight, rows)
        print(f"{'':<14} normed, gathered: {error:.1e}")
        worst = max(worst, error / tolerance)
    return interpreted_verdict(worst, 1.0)  # the worst error over its dtype's tolerance


if __name__ == "__main__":
    sys.exit(main())
