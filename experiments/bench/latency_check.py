"""Checks of the latency objective on a GPU (issue: measured GPU latency):

1. repeatability: one ~120M hybrid measured by `hybrid bench model` in 5 separate processes;
   the spread of the 5 medians (max - min over median) for prefill and decode at batch 1 and 64;
2. physics: decode time against context for a pure-attention and a pure-Mamba-3 model (the
   first should grow with the KV cache read, the second stay flat), achieved bytes/s against
   the copy bandwidth measured in the same run;
3. the latency-only sweep of experiments/latency_sweep.yaml at batch 1 and 64, context 4096.

    python experiments/bench/latency_check.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hybrid.config import ModelConfig
from hybrid.search.bench import bench_rows, print_rows, space_architectures
from hybrid.search.space import load_space

ROOT = Path(__file__).resolve().parents[2]
HYBRID_120M = [
    "--pattern",
    "M-M-M-M-M-*-" * 2,
    "--d-model",
    "768",
    "--set",
    "attention.n_heads=12",
    "--set",
    "attention.n_kv_heads=4",
]


def repeatability(batches: list[int], context: int, runs: int, quick: bool) -> list[dict]:
    args = (
        ["--pattern", "M-*-", "--d-model", "64", "--set", "attention.n_heads=4"]
        if quick
        else HYBRID_120M
    )
    medians: dict[tuple[str, int], list[float]] = {}
    for i in range(runs):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [
                sys.executable,
                "-m",
                "hybrid.cli",
                "bench",
                "model",
                *args,
                "--context",
                str(context),
                "--no-cache",
                "--json",
                out.name,
            ]
            for b in batches:
                command += ["--batch", str(b)]
            subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
            for row in json.loads(Path(out.name).read_text()):
                medians.setdefault(("prefill", row["batch"]), []).append(row["prefill_ms"])
                medians.setdefault(("decode", row["batch"]), []).append(row["decode_ms"])
        print(f"  repeatability process {i + 1}/{runs} done", flush=True)
    table = []
    for (kind, batch), values in sorted(medians.items()):
        mid = statistics.median(values)
        table.append(
            {
                "kind": kind,
                "batch": batch,
                "median_ms": mid,
                "spread_pct": 100 * (max(values) - min(values)) / mid,
                "runs": values,
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    batches = [1, 4] if quick else [1, 64]
    context = 256 if quick else 4096

    print("1. repeatability across separate processes")
    repeat = repeatability(batches, context, 3 if quick else 5, quick)
    for r in repeat:
        print(
            f"  {r['kind']:<8} batch {r['batch']:>3}: median {r['median_ms']:.4f} ms, "
            f"spread of the process medians {r['spread_pct']:.2f}%"
        )

    print("\n2. decode time against context (batch 16)")
    d = 64 if quick else 1024
    physics = bench_rows(
        [
            (
                "attention",
                ModelConfig.from_pattern(
                    "*-" * 8, d_model=d, attention={"n_heads": 8, "n_kv_heads": 8}
                ),
            ),
            (
                "mamba3",
                ModelConfig.from_pattern(
                    "M-" * 8, d_model=d, mamba3={"headdim": 32} if quick else {}
                ),
            ),
        ],
        [16],
        [256, 1024] if quick else [1024, 4096, 16384, 32768],
        128,
        "bfloat16",
        device,
        use_cache=False,
    )
    print_rows(physics, device)

    print(f"\n3. latency-only sweep, context {context}")
    space = load_space(ROOT / "experiments" / "latency_sweep.yaml")
    architectures = space_architectures(space)
    if quick:
        architectures = [
            (label, ModelConfig.from_dict({**c.to_dict(), "d_model": 64}))
            for label, c in architectures[:2]
        ]
    sweep = bench_rows(architectures, batches, [context], 512, "bfloat16", device, use_cache=False)
    print_rows(sweep, device)
    if args.out:
        args.out.write_text(
            json.dumps(
                {"repeatability": repeat, "physics": physics, "sweep": sweep}, indent=1, default=str
            )
        )
    print(
        "\nsummary: max spread of process medians "
        f"{max(r['spread_pct'] for r in repeat):.2f}% (target 2%)"
    )


if __name__ == "__main__":
    main()
