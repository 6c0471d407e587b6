"""The Mamba-3 decode step alone (MAMBA3.md §4), at the paper's Table 6 shape: batch 128,
d_model 2048 (64 heads × headdim 64), d_state 64 and 128, SISO and MIMO R=2 and R=4, fp32
and bf16 SSM state (Table 6's columns), bf16 token inputs (column slices of one projection,
as the layer passes them), plus MIMO R=4 with an fp32 state
and fp32 inputs (the case where the published step falls to 19% of copy). Our CuTe DSL and
Triton kernels against the PyTorch step (the oracle's token update) in the same run, each
timed in CUDA graphs of consecutive steps (common.graphed_step_timing). Bandwidth is given
two ways: all bytes the step must move (state read + written, cached k and x read + written,
the token's inputs, the output), and the state's read + write only (what the paper's figure
counts), each over the device-to-device copy bandwidth measured in the run.

    python experiments/bench/decode.py [--out results.json]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GRAPH_STEPS, cuda_bench, describe_device, graphed_step_timing

from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3State, Mamba3Weights
from hybrid.kernels.mamba3_decode import backend_unavailable, mamba3_step


def problem(batch, heads, p, n, r, device, state_dtype=torch.float32, inputs=torch.bfloat16):
    """One step's tensors: token inputs and the cached k, x in `inputs`, weights in fp32. The
    token inputs are column slices of one (batch, width) projection, as the layer passes
    them (the step kernels read them through their row strides)."""
    s = n // 4  # rope fraction 0.5
    tok = {"device": device, "dtype": inputs}
    f32 = {"device": device, "dtype": torch.float32}
    shapes = [(heads, p), (heads, p), (r, 1, n), (r, 1, n), (heads,), (heads,), (heads,), (s,)]
    widths = [math.prod(shape) for shape in shapes]
    projected = torch.randn(batch, sum(widths), **tok).split(widths, dim=-1)
    pieces = zip(projected, shapes, strict=True)
    token = Mamba3Inputs(*(t.unflatten(-1, shape) for t, shape in pieces))
    mimo = r > 1
    weights = Mamba3Weights(
        torch.randn(heads, **f32) - 2,
        1 + 0.1 * torch.randn(n, **f32),
        1 + 0.1 * torch.randn(n, **f32),
        torch.randn(heads, r, n, **f32),
        torch.randn(heads, r, n, **f32),
        torch.randn(heads, **f32),
        *((torch.randn(heads, r, p, **f32) for _ in range(3)) if mimo else (None,) * 3),
    )
    state = Mamba3State(
        torch.rand(batch, heads, s, **f32) * 6,
        torch.randn(batch, heads, p, n, device=device).to(state_dtype),
        torch.randn(batch, r, heads, n, **tok),
        torch.randn(batch, heads, p, **tok),
        torch.rand(batch, heads, **f32) * 0.2,
    )
    moved = (
        2 * state.nbytes + sum(t.numel() * t.element_size() for t in token) + batch * heads * p * 2
    )
    options = Mamba3Options(rotation="halves" if mimo else "pairwise")
    return token, weights, state, options, moved


def main() -> None:
    if (bench := cuda_bench(__doc__.splitlines()[0])) is None:
        return
    args, device, peak = bench
    print(f"device: {describe_device(device)}; {peak}; per-step times from graphs of "
          f"{GRAPH_STEPS} consecutive steps")  # fmt: skip
    rows = []
    shapes = ((64, 1), (64, 2), (64, 4), (128, 1), (128, 2), (128, 4))
    cases = [(sd, n, r, torch.bfloat16) for sd in (torch.float32, torch.bfloat16)
             for n, r in shapes]  # fmt: skip
    cases += [(torch.float32, n, 4, torch.float32) for n in (64, 128)]
    for state_dtype, n, r, inputs in cases:
        token, weights, state, options, moved = problem(
            128, 64, 64, n, r, device, state_dtype, inputs
        )
        state_bytes = 2 * state.ssm.numel() * state.ssm.element_size()
        row = {"state": str(state_dtype).removeprefix("torch."), "d_state": n, "rank": r,
               "inputs": str(inputs).removeprefix("torch."), "bytes": moved,
               "state_bytes": state_bytes}  # fmt: skip
        for backend in ("cute", "triton", "torch"):
            if (reason := backend_unavailable(token, state, backend)) is not None:
                print(f"{backend} skipped at N={n} R={r}: {reason}")
                row[f"{backend}_ms"] = None
                continue

            def step(backend=backend, token=token, weights=weights, state=state,
                     options=options):  # fmt: skip
                return mamba3_step(token, weights, options, state, backend=backend)

            ms = graphed_step_timing(step, device).median_ms
            row[f"{backend}_ms"] = ms
            row[f"{backend}_gbs"] = moved / ms / 1e6
            row[f"{backend}_pct_copy"] = 100 * moved / ms / 1e6 / peak.copy_gbs
            row[f"{backend}_state_pct_copy"] = 100 * state_bytes / ms / 1e6 / peak.copy_gbs
        rows.append(row)
    print(_table(rows))
    if args.out:
        args.out.write_text(json.dumps({"device": describe_device(device), "rows": rows}, indent=1))


def _table(rows: list[dict]) -> str:
    """One line per case: MB moved (all / state only), then per backend ms, GB/s (all bytes),
    % of copy bandwidth (all bytes) and % of copy bandwidth (state bytes only)."""
    head = f"{'state':>9}{'N':>4}{'R':>3}{'inputs':>9}{'MB all':>8}{'MB state':>9}"
    for backend in ("cute", "triton", "torch"):
        head += f"{backend + ' ms':>11}{'GB/s':>7}{'%copy':>7}{'%st':>6}"
    lines = [head]
    for row in rows:
        line = (f"{row['state']:>9}{row['d_state']:>4}{row['rank']:>3}{row['inputs']:>9}"
                f"{row['bytes'] / 1e6:>8.1f}{row['state_bytes'] / 1e6:>9.1f}")  # fmt: skip
        for backend in ("cute", "triton", "torch"):
            if row[f"{backend}_ms"] is None:
                line += f"{'-':>11}{'-':>7}{'-':>7}{'-':>6}"
                continue
            line += (f"{row[f'{backend}_ms']:>11.4f}{row[f'{backend}_gbs']:>7.0f}"
                     f"{row[f'{backend}_pct_copy']:>7.1f}"
                     f"{row[f'{backend}_state_pct_copy']:>6.1f}")  # fmt: skip
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
