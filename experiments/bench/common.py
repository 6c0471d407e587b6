"""Timing and device ceilings shared by the benchmarks: CUDA-event medians with the
interquartile range, per-call times of short steps from CUDA graphs of consecutive calls, the
card's measured bf16 matmul rate and copy bandwidth, the set-up of CUDA-only benchmarks, and
the latency objective's A/B of a kernel path switched off and on."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid.config import ModelConfig
from hybrid.graphs import capture_cuda_graph
from hybrid.search.latency import LatencyRequest, measure

GRAPH_STEPS = 10  # consecutive calls per graph in graphed_step_timing
COLD_BYTES = 120e6  # weight copies a "cold" projection cycles through: more than an H100's L2


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float

    def __str__(self) -> str:
        return f"{self.median_ms:9.3f} ±{self.iqr_ms:6.3f}"


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on CUDA, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def issue_ms(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float:
    """Host milliseconds to issue one call without waiting for the device. Close to the
    device time, the work is launch-bound (its timing then follows the host's speed). Few
    calls, so the launch queue never fills and blocks the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e3
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return elapsed


def graph_leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose .grad a backward from `out` would accumulate into."""
    leaves, seen, pending = [], set(), [out.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # an AccumulateGrad node
            leaves.append(node.variable)
        pending.extend(parent for parent, _ in node.next_functions)
    return leaves


def training_step(forward: Callable[[], torch.Tensor]) -> Callable[[], object]:
    """Forward then backward of a random output gradient, with fresh gradients on every call,
    as a step after zero_grad runs them: calling `.backward()` again on the same leaves would
    add into their .grad, an extra pass per leaf (~0.13 ms of the 8 × 2048 Mamba-3 op) that
    training does not pay."""
    out = forward()
    leaves, grad = graph_leaves(out), torch.randn_like(out)
    del out
    return lambda: torch.autograd.grad(forward(), leaves, grad)


def time_ms(
    fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20
) -> Timing:
    """Median and interquartile range of `reps` timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = [time_once(fn, device) for _ in range(reps)]
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return Timing(statistics.median(samples), q3 - q1)


def graphed_step_timing(
    step: Callable[[], object], device: torch.device, steps: int = GRAPH_STEPS, reps: int = 20
) -> Timing:
    """Per-call device time of `step` (a decode step, a forward+backward) from a CUDA graph
    of `steps` consecutive calls. Events around a single replay also time the host's graph
    launch: the GPU has reached the start event before the kernels arrive (~8 µs on an H100:
    5-13% of a 60-150 µs Mamba-3 step). Back to back, as a decoding model runs its layers,
    only the in-graph gap between kernels remains."""
    graph = capture_cuda_graph(lambda: [step() for _ in range(steps)])
    timing = time_ms(graph, device, reps=reps)
    return Timing(timing.median_ms / steps, timing.iqr_ms / steps)


def weight_copies(n: int, k: int, cold: bool, device: torch.device) -> list[torch.Tensor]:
    """bf16 (n, k) projection weights to time against: one, which stays in L2 across calls
    ("hot"), or ("cold") enough copies that calls cycling through them read more than an
    H100's 50 MB L2 together, as a model's layers do."""
    copies = min(400, max(2, int(COLD_BYTES // (n * k * 2)))) if cold else 1
    return [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]


def projection_cases(
    shapes: dict[str, tuple[int, int]], device: torch.device
) -> Iterator[tuple[str, int, int, int, list[torch.Tensor], dict]]:
    """The projection benches' cases: each (output features, input features) shape at one
    and two token rows, weights in L2 ("hot") and not ("cold"), as (label, n, k, rows,
    `weight_copies`, the row's leading keys). A case's copies are freed once the next case's
    exist (≤ 2 × 120 MB)."""
    for (label, (n, k)), rows, cold in itertools.product(shapes.items(), (1, 2), (False, True)):
        weights = weight_copies(n, k, cold, device)
        yield label, n, k, rows, weights, {"shape": label, "features": n, "k": k, "rows": rows,
                                           "l2": "cold" if cold else "hot"}  # fmt: skip


def cycled_us(
    call: Callable[[torch.Tensor], object], weights: list[torch.Tensor], device: torch.device
) -> float:
    """µs per `call(weight)` from a CUDA graph of consecutive calls cycling through weights."""
    cycle = itertools.cycle(weights)
    steps = max(GRAPH_STEPS, len(weights))
    return 1e3 * graphed_step_timing(lambda: call(next(cycle)), device, steps=steps).median_ms


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: float  # bf16 (CUDA) or fp32 (CPU), 2·n³ per product
    copy_gbs: float  # device-to-device copy, bytes read + written

    def __str__(self) -> str:
        return f"matmul {self.matmul_tflops:.1f} TFLOP/s, copy {self.copy_gbs:.0f} GB/s"


def measure_ceilings(device: torch.device) -> Ceilings:
    """Measured here, in this run: a large random matmul and a large copy."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_ms(lambda: a @ b, device, reps=10)
    src = torch.randn((1 << 28) if cuda else (1 << 24), device=device)
    dst = torch.empty_like(src)
    cp = time_ms(lambda: dst.copy_(src), device, reps=10)
    return Ceilings(2 * n**3 / mm.median_ms / 1e9, 2 * src.nbytes / cp.median_ms / 1e6)


def cuda_bench(description: str) -> tuple[argparse.Namespace, torch.device, Ceilings] | None:
    """A benchmark of CUDA-only kernels: its arguments (`--out FILE.json`), the CUDA device and
    its ceilings, measured now; None without CUDA, saying so (those kernels' CPU check is
    their interpreter test)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the kernel's CPU check is the interpreter test)")
        return None
    device = torch.device("cuda")
    return args, device, measure_ceilings(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def write_results(
    args: argparse.Namespace, device: torch.device, peak: Ceilings, **parts: object
) -> None:
    """A CUDA-only benchmark's --out JSON (where asked for): the device, the copy bandwidth
    measured in the run and the benchmark's parts."""
    if args.out:
        record = {"device": describe_device(device), "copy_gbs": peak.copy_gbs, **parts}
        args.out.write_text(json.dumps(record, indent=1))


def decode_architectures() -> dict[str, ModelConfig]:
    """Four 31M architectures of the latency sweep's kind (d_model 512, 8 mixers + 8
    SwiGLUs): pure Mamba-3 SISO and MIMO R=4, a 1:1 hybrid, pure attention."""

    def arch(pattern: str, rank: int = 1) -> ModelConfig:
        return ModelConfig.from_pattern(
            pattern, d_model=512, mamba3={"d_state": 128, "headdim": 64, "mimo_rank": rank},
            attention={"n_heads": 8, "n_kv_heads": 2}, swiglu={"hidden": 1376},
        )  # fmt: skip

    return {"M- x 8": arch("M-" * 8), "M- x 8, R=4": arch("M-" * 8, 4),
            "M-*- x 4": arch("M-*-" * 4), "*- x 8": arch("*-" * 8)}  # fmt: skip


def switched_latency(
    label: str,
    config: ModelConfig,
    request: LatencyRequest,
    device: torch.device,
    switch: Callable[[bool], None],
    passes: int = 2,
) -> dict:
    """The latency objective's own figure (`measure`, µs) for one architecture with a kernel
    path switched off and on by `switch`, in interleaved passes (left on); prints one row:
    label, off × passes, on × passes, best on / best off."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(passes):
        for on in (False, True):
            switch(on)
            times[on].append(1e3 * measure(config, request, device).median_ms)
    switch(True)
    ratio = min(times[True]) / min(times[False])
    cells = "".join(f"{t:>9.1f}" for t in times[False] + times[True])
    print(f"{label:<30}{cells}{ratio:>9.3f}", flush=True)
    return {"model": label, "request": str(request), "off_us": times[False],
            "on_us": times[True], "ratio": ratio}  # fmt: skip


def switched_decode_rows(
    architectures: dict[str, ModelConfig],
    switch: Callable[[bool], None],
    what: str,
    device: torch.device,
    requests: tuple[LatencyRequest, ...] = (
        LatencyRequest("decode", 1, 2048),
        LatencyRequest("decode", 2, 2048),
    ),
) -> list[dict]:
    """`switched_latency` rows of the latency objective's decode steps (by default batch 1
    and 2 at context 2048) for each architecture, under a header per request naming what is
    switched."""
    rows = []
    for request in requests:
        print(f"\nbatch-{request.batch} decode step (latency objective, context "
              f"{request.length}), µs: {what} off ×2, on ×2")  # fmt: skip
        print(f"{'model':<30}{'off':>9}{'off':>9}{'on':>9}{'on':>9}{'on/off':>9}")
        rows += [
            switched_latency(label, config, request, device, switch)
            for label, config in architectures.items()
        ]
    return rows
