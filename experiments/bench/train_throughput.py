"""Training throughput through the real training loop (`hybrid.train.train`, bf16 autocast on
CUDA): ~20M-parameter models (a 3:1 Mamba-3:attention hybrid and a pure Mamba-3 model, each
with the Triton scan and with the chunked PyTorch path, and a pure Transformer of about the
same size as the peer) and a ~120M `M-M-M-*-` hybrid on both Mamba-3 paths, each with its
step replayed from a CUDA graph (`train.cuda_graph`, the default on CUDA) and issued eagerly;
`--steps-as graph,graph-det` adds runs under `train.deterministic` (the `-det` suffix).
Steady-state tokens/s is measured between the first and the last logged step (compilation,
warm-up and capture excluded); model FLOP utilisation uses each model's `flops_per_token` × 3
against the matmul rate measured in the same run; "peak GB" is the run's peak reserved memory.

    python experiments/bench/train_throughput.py            # GPU figures in BENCHMARKS.md
    python experiments/bench/train_throughput.py --quick    # small, any device (eager)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_device, measure_ceilings

from hybrid.config import ModelConfig
from hybrid.data import CorpusSpec
from hybrid.model import HybridLM
from hybrid.token_cache import prepare_data
from hybrid.train import TrainConfig, train

MODELS = {  # name: (pattern, d_model, attention heads, Mamba-3 scan backend)
    "hybrid 3:1": ("M-M-M-*-M-M-M-*-M-M-", 384, 6, "triton"),
    "hybrid 3:1 chunked": ("M-M-M-*-M-M-M-*-M-M-", 384, 6, "chunked"),
    "mamba3": ("M-" * 10, 384, 6, "triton"),
    "mamba3 chunked": ("M-" * 10, 384, 6, "chunked"),
    "transformer": ("*-" * 12, 384, 6, "auto"),
    "hybrid 120M": ("M-M-M-*-" * 4, 768, 12, "triton"),
    "hybrid 120M chunked": ("M-M-M-*-" * 4, 768, 12, "chunked"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument(
        "--steps-as",
        default="graph,eager",
        help="comma-separated: graph, eager, graph-det, eager-det (-det: train.deterministic)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in args.steps_as.split(",") if device.type == "cuda" or "graph" not in m]
    peak = measure_ceilings(device)
    data = prepare_data(CorpusSpec(args.corpus))
    if args.quick:
        batch, seq_len, steps, log_every, scale = 4, 64, 12, 4, 1 / 6
    else:
        batch, seq_len, steps, log_every, scale = 32, 512, 80, 20, 1
    print(f"device: {describe_device(device)}; {peak}; batch {batch} x {seq_len} tokens")
    rows = []
    runs = [(name, mode) for name in MODELS for mode in modes]
    for name, mode in runs:
        pattern, d_model, heads, backend = MODELS[name]
        if args.models and name not in args.models.split(","):
            continue
        if device.type == "cpu" and backend == "triton":
            continue  # the Triton scan needs CUDA
        config = ModelConfig.from_pattern(
            pattern,
            d_model=int(d_model * scale) // 64 * 64 or 64,
            attention={"n_heads": max(1, int(heads * scale))},
            mamba3={"backend": backend} if "M" in pattern else None,
        )
        train_config = TrainConfig(
            batch_size=batch,
            seq_len=seq_len,
            steps=steps,
            log_every=log_every,
            eval_tokens=batch * seq_len,
            cuda_graph=mode.startswith("graph"),
            deterministic=mode.endswith("-det"),
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = train(config, data, train_config, device=device, progress=False)
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
        first, last = result.curve[0], result.curve[-1]
        rate = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
        flops = 3 * HybridLM(config, device="meta").flops_per_token(seq_len)
        rows.append(
            {
                "model": name,
                "step": mode,
                "pattern": config.pattern,
                "d_model": config.d_model,
                "params": HybridLM(config, device="meta").num_params(),
                "tokens_per_s": rate,
                "mfu_pct": 100 * rate * flops / (peak.matmul_tflops * 1e12),
                "step_ms": 1e3 * batch * seq_len / rate,
                "final_loss": last["loss"],
                "peak_reserved_gb": reserved / 2**30,
            }
        )
        # each model starts from an empty allocator: cached blocks of the previous model's
        # shapes (the chunked path's float32 temporaries, say) must not shape the next one's
        del result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rate = {(r["model"], r["step"]): r["tokens_per_s"] for r in rows}
    print(
        f"\n{'model':<20}{'step':<11}{'pattern':<22}{'params':>12}{'tokens/s':>12}{'step ms':>9}"
        f"{'MFU %':>7}{'peak GB':>9}{'vs transformer':>16}"
    )
    for r in rows:
        peer = rate.get(("transformer", r["step"]))
        ratio = f"{r['tokens_per_s'] / peer:.2f}x" if peer else "-"
        print(
            f"{r['model']:<20}{r['step']:<11}{r['pattern'][:21]:<22}{r['params']:>12,}"
            f"{r['tokens_per_s']:>12,.0f}{r['step_ms']:>9.1f}{r['mfu_pct']:>7.1f}"
            f"{r['peak_reserved_gb']:>9.1f}{ratio:>16}"
        )
    for (name, mode), tokens_per_s in rate.items():
        if (f"{name} chunked", mode) in rate:
            speedup = tokens_per_s / rate[(f"{name} chunked", mode)]
            print(f"{name} ({mode}): Triton scan {speedup:.2f}x the chunked PyTorch path")
        if mode == "graph" and (name, "eager") in rate:
            print(f"{name}: CUDA-graphed step {tokens_per_s / rate[(name, 'eager')]:.2f}x eager")
        if mode.endswith("-det") and (name, mode[:-4]) in rate:
            ratio = tokens_per_s / rate[(name, mode[:-4])]
            print(f"{name} ({mode[:-4]}): deterministic {ratio:.2f}x the default")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": describe_device(device),
                    "matmul_tflops": peak.matmul_tflops,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
