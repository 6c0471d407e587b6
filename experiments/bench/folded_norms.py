"""Block norms folded into the projections that follow them (`add_rms_norm_linear`): at the
in-projection shapes of d_model 512, 1024 and 2048 models and the head, one and two token
rows, the residual add + RMSNorm kernel followed by the projection kernel against the one
kernel that does both (`normed_gemv`), both chained by PDL as a decode step runs them, with
cuBLAS after the norm kernel as the peer, in the same run, weights L2-resident ("hot") and
not ("cold"); then the latency objective's batch-1 and batch-2 decode steps
(`hybrid.search.latency.measure`) with the fold switched off and on, two passes each, for
the four 31M architectures and a d_model-2048 5:1 hybrid.

    python experiments/bench/folded_norms.py [--out results.json]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

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

import hybrid.kernels.small_batch_linear as sbl
from hybrid.config import ModelConfig
from hybrid.kernels.norms import add_rms_norm

SHAPES = {  # label: (output features, d_model): the projections a block's norm feeds
    "Mamba-3 in_proj, d 512": (2384, 512),
    "SwiGLU in, d 512": (2752, 512),
    "attention qkv, d 512": (768, 512),
    "head (50,257), d 512": (50257, 512),
    "Mamba-3 in_proj, d 1024": (4448, 1024),
    "SwiGLU in, d 1024": (5504, 1024),
    "Mamba-3 in_proj, d 2048": (8800, 2048),
    "SwiGLU in, d 2048": (8192, 2048),
}
EPS = 1e-5


def wide_hybrid() -> ModelConfig:
    """A d_model-2048 hybrid of the paper's 1.5B width: 5 Mamba-3 per attention layer."""
    return ModelConfig.from_pattern(
        ("M-" * 5 + "*-") * 2, d_model=2048, mamba3={"d_state": 128, "headdim": 64},
        attention={"n_heads": 16, "n_kv_heads": 4}, swiglu={"hidden": 4096},
    )  # fmt: skip


def paths(x: Tensor, delta: Tensor, scale: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """A block's entry three ways, each a function of the projection's weight."""
    return {
        "cublas": lambda w: F.linear(add_rms_norm(x, delta, scale, EPS)[1], w),
        "separate": lambda w: sbl.gemv(add_rms_norm(x, delta, scale, EPS)[1], w),
        "folded": lambda w: sbl.normed_gemv(x, delta, scale, EPS, w)[1],
    }


def fold(on: bool) -> None:
    sbl.FOLD_NORMS = on


def kernel_rows(device: torch.device) -> list[dict]:
    rows = []
    for label, n, k, n_rows, weights, row in projection_cases(SHAPES, device):
        x, delta = (torch.randn(n_rows, k, device=device, dtype=torch.bfloat16) for _ in "xd")
        scale = 1 + torch.rand(k, device=device, dtype=torch.bfloat16)
        taken = (n_rows == 1 or sbl.two_rows_pay(weights[0])) and sbl.fold_pays(weights[0])
        row["taken"] = taken
        for name, call in paths(x, delta, scale).items():
            row[f"{name}_us"] = cycled_us(call, weights, device)
        row["folded_vs_separate"] = row["folded_us"] / row["separate_us"]
        rows.append(row)
        print(f"{label:<26}{n:>7}{k:>6}{n_rows:>5}{row['l2']:>6}{row['cublas_us']:>10.2f}"
              f"{row['separate_us']:>10.2f}{row['folded_us']:>10.2f}"
              f"{row['folded_vs_separate']:>9.3f}{'' if taken else '  (not folded)'}",
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    if (bench := cuda_bench(__doc__.splitlines()[0])) is None:
        return
    args, device, peak = bench
    print(f"device: {describe_device(device)}; {peak}; bf16, µs per call from graphs of "
          f"consecutive calls, chained by PDL; cuBLAS: norm kernel + F.linear; separate: "
          f"norm kernel + projection kernel; folded: one kernel; (not folded): rows that stay "
          f"separate")  # fmt: skip
    print(f"{'projection':<26}{'N':>7}{'K':>6}{'rows':>5}{'L2':>6}{'cuBLAS':>10}"
          f"{'separate':>10}{'folded':>10}{'fold/sep':>9}")  # fmt: skip
    kernels = kernel_rows(device)
    architectures = {**decode_architectures(), "(M-x5 *-) x 2, d 2048": wide_hybrid()}
    models = switched_decode_rows(architectures, fold, "fold", device)
    write_results(args, device, peak, kernels=kernels, models=models)


if __name__ == "__main__":
    main()
