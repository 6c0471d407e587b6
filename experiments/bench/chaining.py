"""Programmatic dependent launch in the latency objective's graphs: each architecture's
decode step at batch 1 (contexts 2048 and 8192) and 2 (context 2048), timed by
`hybrid.search.latency.measure` with the decode kernels' chaining switched off and on
(`hybrid/kernels/dependent_launch.py`), two interleaved passes each; then a chain of 32
batch-1 projections alone, the kernel most of a step consists of.

    python experiments/bench/chaining.py [--out results.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    cuda_bench,
    decode_architectures,
    describe_device,
    graphed_step_timing,
    switched_decode_rows,
    write_results,
)

import hybrid.kernels.dependent_launch as dl
from hybrid.kernels.small_batch_linear import gemv
from hybrid.search.latency import LatencyRequest

REQUESTS = (LatencyRequest("decode", 1, 2048), LatencyRequest("decode", 1, 8192),
            LatencyRequest("decode", 2, 2048))  # fmt: skip
CHAIN = [(2384, 512), (512, 1024), (2752, 512), (512, 1376)] * 8  # (out, in): d_model 512


def switch(on: bool) -> None:
    dl.ENABLED = on


def projection_chain(device: torch.device) -> dict:
    """32 batch-1 projections, each fed the previous one's output, chained off and on."""
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for n, k in CHAIN]
    x = torch.randn(1, 2752, device=device, dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        y = x
        for w in weights:
            y = gemv(y[:, : w.shape[1]], w)
        return y

    row = {}
    for on in (False, True):
        switch(on)
        row["on_us" if on else "off_us"] = 1e3 * graphed_step_timing(chain, device).median_ms
    row["per_kernel_saved_us"] = (row["off_us"] - row["on_us"]) / len(CHAIN)
    print(
        f"{len(CHAIN)} projections (d_model 512): off {row['off_us']:.1f} µs, on "
        f"{row['on_us']:.1f} µs, {row['per_kernel_saved_us']:.2f} µs a kernel saved"
    )
    return row


def main() -> None:
    if (bench := cuda_bench(__doc__.splitlines()[0])) is None:
        return
    args, device, peak = bench
    print(f"device: {describe_device(device)}; {peak}; bf16; {dl.planned(device)}")
    models = switched_decode_rows(decode_architectures(), switch, "chaining", device, REQUESTS)
    print()
    chain = projection_chain(device)
    write_results(args, device, peak, models=models, chain=chain)


if __name__ == "__main__":
    main()
