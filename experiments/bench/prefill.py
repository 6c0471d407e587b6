"""Mamba-3 prefill/training kernels at the paper's shapes (H=32, P=64, N=128, chunk 64,
bf16): forward and forward+backward times, with peers in the same run.

Rows: our Triton scan (SISO; MIMO R=2 and R=4 at 64 score rows per chunk) as the whole op
— raw in_proj outputs in, gated output out: discretisation, B/C RMSNorm and bias, angle sums,
rotation, D and the silu(z) gate included, like the published kernel's "with D and Z" — and
the scan core alone (prepared q, k and x, with mimo_x for MIMO); the chunked PyTorch path;
fla-core's `chunk_simple_gla` (Mamba-2-style SSD) and `chunk_gated_delta_rule` (Gated
DeltaNet) at equal (B, L, H, K=N, V=P); torch SDPA causal attention at the same width (32
heads of 64).

TFLOP/s counts the core's matmul FLOPs (below) against the bf16 matmul rate measured here.
"host ms" is what the host takes to issue one forward+backward without waiting: where it is
close to "f+b ms" the op is launch-bound and its time follows the host's speed. "graph ms" is
the forward+backward replayed from a CUDA graph: the device's time alone, whatever the host.

    python experiments/bench/prefill.py            # the H100 run in BENCHMARKS.md
    python experiments/bench/prefill.py --quick    # one small shape, a smoke test
    python experiments/bench/prefill.py --quick --device cpu  # the rows that run off CUDA
    python experiments/bench/prefill.py --profile 8,2048,1   # per-kernel times of one op
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    describe_device,
    graphed_step_timing,
    issue_ms,
    measure_ceilings,
    time_ms,
    training_step,
)

from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3Weights
from hybrid.kernels.mamba3_prefill_core import mamba3_core
from hybrid.kernels.mamba3_scan import mamba3_scan

HEADS, HEADDIM, D_STATE, CHUNK_ROWS = 32, 64, 128, 64
PAPER = {(8, 2048): (1.75, 3.73), (2, 8192): (2.15, 4.38), (1, 16384): (3.64, 7.74)}


def core_flops(tokens: int, rank: int, heads: int = HEADS, p: int = HEADDIM, n: int = D_STATE):
    """Forward matmul FLOPs of the chunked scan: per row, the chunk's scores (2·Q·N) and
    their product with v (2·Q·P), the start state's read-out and the chunk state (2·P·N
    each); the backward does 2.5x that (recomputed states, state gradients, dq, dk, dv)."""
    rows = tokens * rank * heads
    return rows * (2 * CHUNK_ROWS * (n + p) + 4 * p * n)


def random_op(batch, length, rank, device, norm: bool = False):
    """Raw in_proj outputs (bf16) and fp32 layer weights, initialised as the layer does;
    `norm` adds the pre-gate grouped RMSNorm (the hybrids' option)."""
    bf = torch.bfloat16

    def r(*shape, dtype=bf, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    inputs = Mamba3Inputs(
        x=r(batch, length, HEADS, HEADDIM),
        z=r(batch, length, HEADS, HEADDIM),
        b=r(batch, length, rank, 1, D_STATE),
        c=r(batch, length, rank, 1, D_STATE),
        dt=r(batch, length, HEADS),
        a=r(batch, length, HEADS),
        trap=r(batch, length, HEADS),
        angle=r(batch, length, D_STATE // 4),
    )
    ones = {"device": device, "dtype": torch.float32}
    mimo = rank > 1
    weights = Mamba3Weights(
        dt_bias=r(HEADS, dtype=torch.float32) - 3.0,
        b_norm=torch.ones(D_STATE, **ones, requires_grad=True),
        c_norm=torch.ones(D_STATE, **ones, requires_grad=True),
        b_bias=torch.ones(HEADS, rank, D_STATE, **ones, requires_grad=True),
        c_bias=torch.ones(HEADS, rank, D_STATE, **ones, requires_grad=True),
        d=torch.ones(HEADS, **ones, requires_grad=True),
        mimo_x=torch.full((HEADS, rank, HEADDIM), 1 / rank, **ones, requires_grad=True)
        if mimo
        else None,
        mimo_z=torch.ones(HEADS, rank, HEADDIM, **ones, requires_grad=True) if mimo else None,
        mimo_o=torch.full((HEADS, rank, HEADDIM), 1 / rank, **ones, requires_grad=True)
        if mimo
        else None,
        out_norm=torch.ones(HEADS, HEADDIM, **ones, requires_grad=True) if norm else None,
    )
    return inputs, weights, Mamba3Options(rotation="pairwise" if rank == 1 else "halves")


def op_runner(
    batch, length, rank, device, path: str, norm: bool = False
) -> Callable[[], torch.Tensor]:
    """The op as training runs it: no initial state, no final state gathered."""
    inputs, weights, options = random_op(batch, length, rank, device, norm)
    tokens = CHUNK_ROWS // rank
    return lambda: mamba3_scan(
        inputs, weights, options, None, tokens, backend=path, final_state=False
    )[0]


def core_runner(batch, length, rank, device) -> Callable[[], torch.Tensor]:
    tokens = batch * length
    bf = torch.bfloat16

    def r(*shape, dtype=bf):
        return torch.randn(*shape, device=device).to(dtype).requires_grad_()

    q = r(tokens, rank, HEADS, D_STATE)
    k = r(tokens, rank, HEADS, D_STATE)
    x = r(tokens, HEADS, HEADDIM) if rank > 1 else r(tokens, 1, HEADS, HEADDIM)
    mimo_x = r(HEADS, rank, HEADDIM, dtype=torch.float32) if rank > 1 else None
    a = (-0.05 * torch.rand(tokens, HEADS, device=device)).requires_grad_()
    s = (0.1 * torch.rand(tokens, HEADS, device=device)).requires_grad_()
    g = (0.05 * torch.rand(tokens, HEADS, device=device)).requires_grad_()
    table = ChunkTable.build([b * length for b in range(batch + 1)], CHUNK_ROWS // rank, device)
    return lambda: mamba3_core(q, k, x, a, s, g, None, table, mimo_x)[0]


FLA_GUARD_NOTE = "fla bwd past its #640 guard: time only"


@functools.cache  # once per process: every fla row then carries the note
def fla_backward_unguarded() -> bool:
    """fla refuses its gated backward on Hopper with Triton >= 3.4, < 3.7.1 (fla #640: that
    Triton emits a wrong layout conversion, so dq/dk/dg come out wrong). The work, and so
    the time, is the same as a correct build's (fla's fix adds one 8 KB scratch round trip a
    program), so the bench lifts the guard to time the peer's forward+backward, and says so
    in the row's note. True where it lifted it."""
    try:
        from fla.ops.common import chunk_o
    except ImportError:
        return False
    flags = ("IS_NVIDIA_HOPPER", "TRITON_ABOVE_3_4_0", "TRITON_ABOVE_3_7_1")
    if not all(hasattr(chunk_o, flag) for flag in flags):
        return False
    guarded = chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0
    if not guarded or chunk_o.TRITON_ABOVE_3_7_1:
        return False
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return True


def fla_runner(batch, length, device, kind: str) -> Callable[[], torch.Tensor] | None:
    try:
        if kind == "simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla as fn
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn
    except ImportError:
        return None
    note = FLA_GUARD_NOTE if fla_backward_unguarded() else ""
    bf = torch.bfloat16

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(bf).requires_grad_()

    q, k = r(batch, length, HEADS, D_STATE), r(batch, length, HEADS, D_STATE)
    v = r(batch, length, HEADS, HEADDIM)
    g = F.logsigmoid(torch.randn(batch, length, HEADS, device=device) + 4).requires_grad_()
    if kind == "simple_gla":
        run = lambda: fn(q, k, v, g)[0]  # noqa: E731
    else:
        beta = torch.rand(batch, length, HEADS, device=device, dtype=bf).requires_grad_()
        run = lambda: fn(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
    run.note = note
    return run


def sdpa_runner(batch, length, device) -> Callable[[], torch.Tensor]:
    def r():
        shape = (batch, HEADS, length, HEADDIM)
        return torch.randn(*shape, device=device, dtype=torch.bfloat16).requires_grad_()

    q, k, v = r(), r(), r()
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def timed(fn: Callable[[], torch.Tensor], device) -> tuple[float | None, ...]:
    """(forward ms, forward+backward ms, host ms to issue a forward+backward, the same from a
    CUDA graph, note); None where it runs out of memory or the kernel refuses. The note starts
    from the runner's own (`fla_backward_unguarded`)."""
    fwd = both = host = graphed = None
    note = getattr(fn, "note", "")
    try:
        with torch.no_grad():
            fwd = time_ms(fn, device, warmup=3, reps=10).median_ms
        train = training_step(fn)
        both = time_ms(train, device, warmup=2, reps=10).median_ms
        host = issue_ms(train, device)
        if device.type == "cuda":
            graphed = graphed_step_timing(train, device, steps=2, reps=10).median_ms
    except torch.OutOfMemoryError:
        note = "out of memory"
    except RuntimeError as err:
        note = "; ".join(filter(None, (note, str(err).split(".")[0][:80])))
    finally:
        torch.cuda.empty_cache()
    return fwd, both, host, graphed, note


def rows_for(batch, length, device, only: str | None):
    runs = [  # (name, runner, MIMO rank (None: attention), needs CUDA)
        ("ours SISO (op)", lambda: op_runner(batch, length, 1, device, "triton"), 1, True),
        ("ours SISO (core)", lambda: core_runner(batch, length, 1, device), 1, True),
        ("ours MIMO R=2 (op)", lambda: op_runner(batch, length, 2, device, "triton"), 2, True),
        ("ours MIMO R=4 (op)", lambda: op_runner(batch, length, 4, device, "triton"), 4, True),
        ("ours MIMO R=4 + norm (op)",
         lambda: op_runner(batch, length, 4, device, "triton", norm=True), 4, True),
        ("ours MIMO R=4 (core)", lambda: core_runner(batch, length, 4, device), 4, True),
        ("chunked PyTorch SISO", lambda: op_runner(batch, length, 1, device, "chunked"), 1,
         False),
        ("fla chunk_simple_gla", lambda: fla_runner(batch, length, device, "simple_gla"), 1,
         True),
        ("fla chunk_gated_delta", lambda: fla_runner(batch, length, device, "gdn"), 1, True),
        ("torch SDPA causal", lambda: sdpa_runner(batch, length, device), None, False),
    ]  # fmt: skip
    out = []
    for name, make, rank, needs_cuda in runs:
        if only and not any(word in name for word in only.split(",")):
            continue
        if needs_cuda and device.type != "cuda":
            out.append({"kernel": name, "batch": batch, "seq_len": length, "note": "needs CUDA"})
            continue
        fn = make()
        if fn is None:
            out.append({"kernel": name, "batch": batch, "seq_len": length, "missing": True})
            continue
        fwd, both, host, graphed, note = timed(fn, device)
        flops = core_flops(batch * length, rank) if rank else None
        if rank is None:  # causal attention: QK and PV over the lower triangle
            flops = 2 * 2 * batch * HEADS * length * length * HEADDIM / 2
        out.append(
            {"kernel": name, "batch": batch, "seq_len": length, "fwd_ms": fwd,
             "fwd_bwd_ms": both, "fwd_bwd_host_ms": host, "fwd_bwd_graph_ms": graphed,
             "fwd_tflops": flops / fwd / 1e9 if fwd else None,
             "fwd_bwd_tflops": 3.5 * flops / both / 1e9 if both else None, "note": note}
        )  # fmt: skip
        del fn
    return out


def profile_op(batch: int, length: int, rank: int, device) -> None:
    """Per-kernel CUDA time of one forward+backward of the whole op: where the time outside
    the scan goes."""
    from torch.profiler import ProfilerActivity, profile

    fn = op_runner(batch, length, rank, device, "triton")
    train = training_step(fn)
    for _ in range(3):
        train()
    host_ms = issue_ms(train, device)
    device_ms = time_ms(train, device, warmup=1, reps=10).median_ms
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities, record_shapes=True) as prof:
        train()
        torch.cuda.synchronize()
    print(
        f"\nB={batch} L={length} R={rank}: one forward+backward of the op: {device_ms:.3f} ms "
        f"(CUDA events), {host_ms:.3f} ms for the host to issue it (launch-bound if close)"
    )
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
    print("PyTorch operators by device time, with input shapes:")
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="device_time_total", row_limit=40, max_name_column_width=40))


print = functools.partial(print, flush=True)  # rows appear as they are measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: off CUDA "
                        "only the chunked PyTorch and SDPA rows run")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--only", help="comma-separated substrings of the kernel names to run")
    parser.add_argument("--profile", metavar="B,L,R", help="profile the op at one shape, exit")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.profile:
        profile_op(*(int(v) for v in args.profile.split(",")), device)
        return
    if device.type == "cuda":
        # leaves made on the legacy default stream cannot take part in a captured backward
        # (the "graph ms" column): everything runs on a stream of its own
        torch.cuda.set_stream(torch.cuda.Stream(device))
    ceilings = measure_ceilings(device)
    print(describe_device(device), "|", ceilings)
    shapes = ([(2, 512)] if device.type == "cuda" else [(1, 128)]) if args.quick else list(PAPER)
    rows = []
    print(
        f"{'kernel':<26}{'B':>3}{'L':>7}{'fwd ms':>9}{'f+b ms':>9}{'host ms':>9}"
        f"{'graph ms':>10}{'fwd TF/s':>10}{'f+b TF/s':>10}"
    )
    for batch, length in shapes:
        for row in rows_for(batch, length, device, args.only):
            rows.append(row)

            def f(key, spec=".3f", row=row):
                value = row.get(key)
                return "-" if value is None else format(value, spec)

            print(
                f"{row['kernel']:<26}{batch:>3}{length:>7}{f('fwd_ms'):>9}{f('fwd_bwd_ms'):>9}"
                f"{f('fwd_bwd_host_ms'):>9}{f('fwd_bwd_graph_ms'):>10}{f('fwd_tflops', '.1f'):>10}"
                f"{f('fwd_bwd_tflops', '.1f'):>10}"
                f"  {row.get('note', '')}"
            )
        if (batch, length) in PAPER:
            fwd, both = PAPER[(batch, length)]
            print(f"{'published SISO (H100)':<26}{batch:>3}{length:>7}{fwd:>9.3f}{both:>9.3f}")
    ours = {(r["batch"], r["seq_len"]): r for r in rows if r["kernel"] == "ours SISO (op)"}
    compared = [shape for shape in PAPER if ours.get(shape, {}).get("fwd_bwd_ms")]
    if compared:
        print("\nours SISO (op) vs the published Mamba-3 SISO kernel (ratio < 1 is faster):")
    for shape in compared:
        (fwd, both), r = PAPER[shape], ours[shape]
        graph = r.get("fwd_bwd_graph_ms")
        print(f"  B={shape[0]} L={shape[1]}: fwd {r['fwd_ms'] / fwd:.2f}x, "
              f"fwd+bwd {r['fwd_bwd_ms'] / both:.2f}x"
              + (f" (from a CUDA graph {graph / both:.2f}x)" if graph else ""))  # fmt: skip
    siso_graph = {shape: r.get("fwd_bwd_graph_ms") for shape, r in ours.items()}
    mimo = [
        r
        for r in rows
        if r["kernel"].startswith("ours MIMO") and r["kernel"].endswith("(op)")
        and r.get("fwd_bwd_graph_ms") and siso_graph.get((r["batch"], r["seq_len"]))
    ]  # fmt: skip
    if mimo:
        print("\nMIMO op / ours SISO (op), forward+backward from CUDA graphs (R=4 target 1.6x):")
    for r in mimo:
        ratio = r["fwd_bwd_graph_ms"] / siso_graph[(r["batch"], r["seq_len"])]
        print(f"  {r['kernel']:<26} B={r['batch']} L={r['seq_len']}: {ratio:.2f}x")
    if args.out:
        meta = {"device": describe_device(device), "ceilings": str(ceilings)}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
