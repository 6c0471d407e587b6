"""Run under TRITON_INTERPRET=1 (by tests/test_triton_prefill.py): the Triton prefill against
the float64 oracle — output, final state and the gradient of every input, weight and initial
state entry — in float32 with fresh random inputs, for SISO and MIMO, with an initial state,
partial last chunks, a variable-length batch and both A activations; every other case splits
a group's heads over programs (one head each), so the B/C backward adds per-program parts,
and cuts each sequence's state passes into (up to) three segments joined by the fix-up pass;
the other cases pass the inputs as column slices of one wide tensor, as the layer passes
its in_proj output (the kernels read them through their token strides and write their
gradients into the split's NaN-poisoned buffer); every case again without autograd, a cache
updated in place (its state in and out by the handoff kernels, in one or several row blocks a
program; one case's cache strided, which takes PyTorch's handoff) against the same call under
autograd (PyTorch's handoff); and the scan core
without its D skip, the benchmarks' form; the serial and chunk-parallel sums on their own. Prints
one line per case; non-zero exit past the tolerance."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import (
    angle_err,
    from_leaves,
    interpreted_verdict,
    named_leaves,
    poisoned,
    projection_slices,
    random_inputs,
    random_state,
    random_weights,
    rel_err,
)

from hybrid.kernels import chunked_cumsum as chunked_cumsum_module
from hybrid.kernels import mamba3_prefill_core, projection_grads, rotated_bc, state_handoff
from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.chunked_cumsum import chunked_cumsum
from hybrid.kernels.mamba3_common import A_ACTIVATIONS, Mamba3Options, Mamba3State
from hybrid.kernels.mamba3_prefill import mamba3_prefill
from hybrid.kernels.mamba3_prefill_core import mamba3_core
from hybrid.kernels.mamba3_scan import run_per_sequence
from hybrid.kernels.reference import mamba3_reference
from hybrid.kernels.segment_cumsum import segment_cumsum

HEADS = 3  # with one group, the B/C rotation runs 3 heads (not a power of two) a program
# rank, rotation, pre-gate norm, groups, angles, headdim, d_state, chunk tokens, lengths
CASES = [
    (1, "pairwise", False, 3, 4, 16, 32, 16, None),
    (2, "halves", True, 1, 4, 16, 16, 8, None),
    (4, "halves", False, 3, 2, 16, 16, 4, None),
    (1, "pairwise", True, 1, 4, 16, 16, 16, [5, 21, 17]),
    (2, "halves", False, 1, 2, 32, 16, 8, [9, 14]),
    (8, "halves", True, 1, 2, 16, 16, 2, None),  # the gate backward's 8-token blocks
]
TOLERANCE = 2e-4
LENGTH = 37


def _detached(named: dict, dtype):
    return {k: v.detach().to(dtype).requires_grad_(True) for k, v in named.items()}


def _oracle(named, options, lengths):
    """The oracle per sequence (varlen: each sequence on its own, its own state row)."""
    ins, ws, st = from_leaves(named)
    if lengths is None:
        return mamba3_reference(ins, ws, options, st)
    return run_per_sequence(
        lambda piece, row: mamba3_reference(piece, ws, options, row),
        ins, st, [0, *itertools.accumulate(lengths)],
    )  # fmt: skip


def check_segment_cumsum() -> float:
    """Sums across several token blocks and sequences against float64 torch.cumsum."""
    lengths = [150, 3, 70]
    starts = torch.tensor([0, 150, 153, 223], dtype=torch.int32)
    x, init = torch.randn(223, 3, 5), torch.randn(3, 3, 5) * 4
    worst = 0.0
    for reverse, wrap in ((False, False), (True, False), (False, True)):
        out = segment_cumsum(x, starts, None if reverse else init, reverse=reverse, wrap=wrap)
        for i, piece in enumerate(x.double().split(lengths)):
            expected = piece.flip(0).cumsum(0).flip(0) if reverse else piece.cumsum(0) + init[i]
            mine = out[starts[i] : starts[i + 1]]
            if wrap:
                worst = max(worst, angle_err(mine, expected))
            else:
                worst = max(worst, rel_err(mine, expected))
    print(f"segment cumsum (forward, reverse, wrapped; lengths {lengths}): worst {worst:.1e}")
    return worst


class _Launches:
    """A kernel stand-in that counts its launches (which of chunked_cumsum's paths ran)."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def check_chunked_cumsum() -> float:
    """The chunk-parallel sums against float64 sums per sequence (sequences of one token, of
    a partial last chunk and of more chunks than one step of the carry scan), and the
    one-program-a-sequence sums of short sequences (chunks of a length that is not a power
    of two): the angles (outer-product input, wrapped, with and without initial angles,
    increments that wrap many times) and plain reverse sums."""
    whole = _Launches(chunked_cumsum_module._sequence_sums_kernel)
    chunked_cumsum_module._sequence_sums_kernel = whole
    worst = 0.0
    for lengths, chunk, expect_whole in (([1, 45, 300, 7], 8, False), ([1, 45, 150, 7], 6, True)):
        whole.count = 0
        bounds = [0, *itertools.accumulate(lengths)]
        table = ChunkTable.build(bounds, chunk, torch.device("cpu"))
        delta, theta = torch.rand(bounds[-1], 3) * 2, (torch.rand(bounds[-1], 5) - 0.5) * 6
        plain = torch.randn(bounds[-1], 3, 4)
        for init in (None, torch.rand(len(lengths), 3, 5) * 6):
            phi = chunked_cumsum((delta, theta), table, init, wrap=True)
            inc = (delta[:, :, None] * theta[:, None, :]).double()
            for i, piece in enumerate(inc.split(lengths)):
                expected = piece.cumsum(0) + (init[i].double() if init is not None else 0.0)
                worst = max(worst, angle_err(phi[bounds[i] : bounds[i + 1]], expected))
        suffix = chunked_cumsum(plain, table, reverse=True)
        for i, piece in enumerate(plain.double().split(lengths)):
            expected = piece.flip(0).cumsum(0).flip(0)
            worst = max(worst, rel_err(suffix[bounds[i] : bounds[i + 1]], expected))
        if (whole.count == 3) != expect_whole or whole.count not in (0, 3):
            print(f"chunks of {chunk}: {whole.count} of 3 sums took the whole-sequence kernel")
            worst = float("inf")
        path = "one program a sequence" if expect_whole else "chunk-parallel"
        print(f"{path} sums (chunks of {chunk}, lengths {lengths}): worst {worst:.1e}")
    chunked_cumsum_module._sequence_sums_kernel = whole.kernel
    return worst


def check_core_without_d() -> float:
    """The scan core with and without its D skip (the op always passes D; the benchmarks'
    core, compared with fla, does not): y differs by exactly D·x̃_r, and the gradients of
    x and D by what that term adds."""
    tokens, rank, heads, p, n, chunk = 24, 2, 2, 16, 16, 8
    table = ChunkTable.build([0, 13, tokens], chunk, torch.device("cpu"))
    q, k = torch.randn(2, tokens, rank, heads, n)
    x = torch.randn(tokens, heads, p, requires_grad=True)
    mimo_x = torch.randn(heads, rank, p)
    a, s, g = -0.1 * torch.rand(tokens, heads), torch.rand(tokens, heads), torch.rand(tokens, heads)
    d = torch.randn(heads, requires_grad=True)
    probe = torch.randn(tokens, rank, heads, p)
    with_d = mamba3_core(q, k, x, a, s, g, None, table, mimo_x, d)[0]
    without = mamba3_core(q, k, x, a, s, g, None, table, mimo_x)[0]
    values = mimo_x.transpose(0, 1) * x.detach().unsqueeze(1)  # x̃ (T, R, H, P)
    errors = [rel_err(with_d - without, d.detach()[:, None] * values)]
    dx_with, dd = torch.autograd.grad((with_d * probe).sum(), (x, d))
    (dx_without,) = torch.autograd.grad((without * probe).sum(), (x,))
    skip_dx = (probe * d.detach()[:, None] * mimo_x.transpose(0, 1)).sum(1)
    errors += [rel_err(dx_with - dx_without, skip_dx), rel_err(dd, (probe * values).sum((0, 1, 3)))]
    print(f"core with and without D: y, dx, dD errors {', '.join(f'{e:.1e}' for e in errors)}")
    return max(errors)


def main() -> int:
    projection_grads._allocate = poisoned  # the split's gradient buffer: NaN until written
    worst = max(check_segment_cumsum(), check_chunked_cumsum(), check_core_without_d())
    rotated_bc.MIN_PROGRAMS = 1  # a few tokens: let the cases choose the heads per program
    one_segment = mamba3_prefill_core.state_pass_segments  # 1 here: no SMs to fill
    whole_sequence = chunked_cumsum_module.WHOLE_SEQUENCE_TOKENS  # every case's: short
    whole_tile = state_handoff.TILE  # every case's state in one row block a program
    for case, (rank, rotation, norm, groups, angles, p, n, chunk, lengths) in enumerate(CASES):
        rotated_bc.MAX_HEADS_PER_PROGRAM = 1 if case % 2 else 8
        segments = 3 if case % 2 else 1
        mamba3_prefill_core.state_pass_segments = (lambda *_: 3) if case % 2 else one_segment
        chunked_cumsum_module.WHOLE_SEQUENCE_TOKENS = 0 if case % 2 else whole_sequence
        state_handoff.TILE = 2 * n if case % 2 else whole_tile  # 2 rows a program
        total = sum(lengths) if lengths else LENGTH
        batch, n_seq = (1, len(lengths)) if lengths else (2, 2)
        inputs = random_inputs(batch=batch, length=total, heads=HEADS, headdim=p, d_state=n,
                               rank=rank, groups=groups, angles=angles)  # fmt: skip
        weights = random_weights(heads=HEADS, headdim=p, d_state=n, rank=rank, mimo=rank > 1,
                                 out_norm=norm)  # fmt: skip
        state = random_state(batch=n_seq, heads=HEADS, headdim=p, d_state=n, rank=rank,
                             angles=angles)  # fmt: skip
        options = Mamba3Options(rotation=rotation, a_activation=A_ACTIVATIONS[case % 2])
        leaves = named_leaves(inputs, weights, state)
        ref_leaves, mine_leaves = _detached(leaves, torch.float64), _detached(leaves, torch.float32)

        ref_out, ref_final = _oracle(ref_leaves, options, lengths)
        ins, ws, st = from_leaves(mine_leaves)
        grads = None
        if case % 2 == 0:
            ins, grads = projection_slices(ins)
        bounds = [0, *itertools.accumulate(lengths)] if lengths else None
        out, final = mamba3_prefill(ins, ws, options, st, chunk_size=chunk, cu_seqlens=bounds,
                                    grads=grads)  # fmt: skip
        with torch.no_grad():  # a prefill into a decode cache: handoff kernels, fused gate
            cache = Mamba3State(*(t.detach().clone() for t in st.tensors()))
            if case == 4:  # strided cache tensors: the PyTorch handoff, into them in place
                cache = Mamba3State(*(torch.stack([t, t], -1)[..., 0] for t in cache.tensors()))
            fused, updated = mamba3_prefill(ins, ws, options, cache, chunk_size=chunk,
                                            cu_seqlens=bounds, update_state=True)  # fmt: skip
            # a cache marked empty is not read: its random contents act as no state at all
            fresh_out, fresh = mamba3_prefill(ins, ws, options, None, chunk_size=chunk,
                                              cu_seqlens=bounds)  # fmt: skip
            stale = Mamba3State(*(t.clone() for t in cache.tensors()), empty=True)
            empty_out, _ = mamba3_prefill(ins, ws, options, stale, chunk_size=chunk,
                                          cu_seqlens=bounds, update_state=True)  # fmt: skip
        handoff = max(rel_err(fused, out), *map(rel_err, cache.tensors(), final.tensors()))
        worst = max(worst, handoff if updated is cache else float("inf"))
        from_empty = max(rel_err(empty_out, fresh_out),
                         *map(rel_err, stale.tensors(), fresh.tensors()))  # fmt: skip
        worst = max(worst, from_empty if not stale.empty else float("inf"))
        if case == 0:  # training's call: the same output, no final state gathered
            again, none = mamba3_prefill(ins, ws, options, st, chunk_size=chunk, final_state=False)
            same = none is None and torch.equal(again, out)
            worst = max(worst, 0.0 if same else 1.0)
            print(f"final_state=False: {'same output, no state' if same else 'MISMATCH'}")
        probe_out = torch.randn_like(ref_out)
        probe_ssm = torch.randn_like(ref_final.ssm)
        for o, f, named in ((ref_out, ref_final, ref_leaves), (out, final, mine_leaves)):
            loss = (o * probe_out.to(o.dtype)).sum() + (f.ssm * probe_ssm.to(f.ssm.dtype)).sum()
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
            for v, gr in zip(named.values(), grads, strict=True):
                v.grad = gr
        errors = {
            "out": rel_err(out, ref_out),
            "ssm": rel_err(final.ssm, ref_final.ssm),
            "k": rel_err(final.k, ref_final.k),
            "gamma": rel_err(final.gamma, ref_final.gamma),
        }
        for name, ref in ref_leaves.items():
            mine = mine_leaves[name].grad
            if ref.grad is None or ref.grad.norm() == 0:
                continue
            errors[f"d{name}"] = rel_err(mine, ref.grad)
        name_worst = max(errors, key=errors.get)
        worst = max(worst, errors[name_worst])
        print(
            f"R={rank} {rotation:<8} A={options.a_activation:<10} norm={norm!s:<5} G={groups} "
            f"S={angles} P={p} N={n} "
            f"heads/program<={rotated_bc.MAX_HEADS_PER_PROGRAM} chunk={chunk} "
            f"state-pass segments<={segments} "
            f"sums {'chunk-parallel' if case % 2 else 'one program a sequence'} "
            f"{'sliced' if case % 2 == 0 else 'contiguous'} inputs "
            f"lengths={lengths or [total] * batch}: "
            f"no-grad prefill (cache in place, gate fused) {handoff:.1e}, "
            f"empty cache {from_empty:.1e}, "
            f"out {errors['out']:.1e} "
            f"ssm {errors['ssm']:.1e}, {len(errors) - 4} grads, worst {name_worst} "
            f"{errors[name_worst]:.1e}"
        )
    return interpreted_verdict(worst, TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())
