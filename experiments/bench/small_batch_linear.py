"""Batch-1 and -2 projections: the Triton matrix-vector kernel (`small_batch_linear`), alone
and chained by PDL as a decode step runs it, against cuBLAS (`F.linear`) in the same run, at
the projection shapes of d_model-512 models (the search's 31M architectures), of d_model 1024
and of d_model 2048 (the paper's 1.5B), SwiGLU's output projection also with its gate product
folded in (against the product kernel + cuBLAS), one and two input rows, each timed in CUDA
graphs of consecutive calls with the weight L2-resident ("hot": one weight) and not ("cold":
the calls cycle through copies larger than L2 together, as a model's layers do); then the
latency objective's batch-1 and batch-2 decode steps (`hybrid.search.latency.measure`) of
four architectures with the kernel switched off and on, two passes each.

    python experiments/bench/small_batch_linear.py [--out results.json]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    cuda_bench,
    cycled_us,
    decode_architectures,
    describe_device,
    projection_cases,
    switched_decode_rows,
    write_results,
)

import hybrid.kernels.dependent_launch as dl
import hybrid.kernels.small_batch_linear as sbl
from hybrid.kernels.norms import swiglu

SHAPES = {  # label: (output features, input features)
    "Mamba-3 in_proj, d 512": (2384, 512),
    "Mamba-3 in_proj R=4, d 512": (3152, 512),
    "Mamba-3 out_proj, d 512": (512, 1024),
    "SwiGLU in, d 512": (2752, 512),
    "SwiGLU out, d 512": (512, 1376),
    "attention qkv, d 512": (768, 512),
    "attention out, d 512": (512, 512),
    "head (bytes), d 512": (256, 512),
    "head (50,257), d 512": (50257, 512),
    "Mamba-3 in_proj, d 1024": (4448, 1024),
    "Mamba-3 out_proj, d 1024": (1024, 2048),
    "SwiGLU in, d 1024": (5504, 1024),
    "SwiGLU out, d 1024": (1024, 2752),
    "Mamba-3 in_proj, d 2048": (8800, 2048),
    "SwiGLU in, d 2048": (8192, 2048),
    "SwiGLU out, d 2048": (2048, 4096),
}
# SwiGLU's output projection fed its [gate | up] row: cuBLAS after the separate product kernel
# against the kernel forming silu(gate) ⊙ up itself (`swiglu_linear`)
GATED = {"SwiGLU product + out, d 512": (512, 1376), "SwiGLU product + out, d 2048": (2048, 4096)}


def kernel_rows(device: torch.device, copy_gbs: float) -> list[dict]:
    rows = []
    for label, n, k, n_rows, weights, row in projection_cases({**SHAPES, **GATED}, device):
        gated = label in GATED
        peer = (lambda h, w: F.linear(swiglu(h), w)) if gated else F.linear
        kernel = functools.partial(sbl.gemv, gated=gated)
        x = torch.randn(n_rows, 2 * k if gated else k, device=device, dtype=torch.bfloat16)
        row["taken"] = n_rows == 1 or sbl.two_rows_pay(weights[0])
        for name, fn, chained in (("cublas", peer, False), ("kernel", kernel, False),
                                  ("chained", kernel, True)):  # fmt: skip
            dl.ENABLED = chained
            row[f"{name}_us"] = cycled_us(functools.partial(fn, x), weights, device)
        dl.ENABLED = True
        row["speedup"] = row["cublas_us"] / row["chained_us"]
        row["kernel_pct_copy"] = 100 * n * k * 2 / row["kernel_us"] / 1e3 / copy_gbs
        rows.append(row)
        print(f"{label:<28}{n:>7}{k:>6}{n_rows:>5}{row['l2']:>6}{row['cublas_us']:>10.2f}"
              f"{row['kernel_us']:>10.2f}{row['chained_us']:>10.2f}{row['speedup']:>8.2f}x"
              f"{row['kernel_pct_copy']:>8.0f}%{'' if row['taken'] else '  (not taken)'}",
              flush=True)  # fmt: skip
    return rows


def switch(on: bool) -> None:
    sbl.ENABLED = on


def main() -> None:
    if (bench := cuda_bench(__doc__.splitlines()[0])) is None:
        return
    args, device, peak = bench
    print(f"device: {describe_device(device)}; {peak}; bf16, µs per call from graphs of "
          f"consecutive calls; chained: by PDL; speedup: cuBLAS / chained; % copy: kernel; "
          f"(not taken): rows `takes` leaves to cuBLAS")  # fmt: skip
    print(f"{'projection':<28}{'N':>7}{'K':>6}{'rows':>5}{'L2':>6}{'cuBLAS':>10}{'kernel':>10}"
          f"{'chained':>10}{'speedup':>9}{'% copy':>9}")  # fmt: skip
    kernels = kernel_rows(device, peak.copy_gbs)
    models = switched_decode_rows(decode_architectures(), switch, "kernel", device)
    write_results(args, device, peak, kernels=kernels, models=models)


if __name__ == "__main__":
    main()
