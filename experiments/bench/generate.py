"""End-to-end generation in the form of the Mamba-3 paper's Table 7: prefill a batch of
prompts, then generate N tokens greedily, for four ~1.5B-shaped models of 24 mixers, each
followed by a SwiGLU MLP, at d_model 2048 in bf16: a Transformer (`*-` × 24), pure Mamba-3
SISO and MIMO R=4 (`M-` × 24), and a 5:1 Mamba-3:attention hybrid (`M-M-M-M-M-*-` × 4).

Weights are random (timings only; nothing here measures quality). Attention: 16 query heads
of 128, 4 KV heads (GQA), RoPE; Mamba-3 at the paper's defaults (expand 2, headdim 64,
d_state 128); SwiGLU hidden 5504 (8/3 · d_model); vocabulary 32,000.

- prefill ms: batch × prompt tokens into a preallocated cache (last-position logits only),
  in forwards of at most `--prefill-piece` batch × tokens (65,536: 512 tokens a forward at
  batch 128; a MIMO R=4 layer's one-forward activations over all 262,144 tokens exceed an
  80 GB card), median of `--repeats` after a warm-up prefill.
- decode ms/token: N - 1 replays of one CUDA graph of `HybridLM.step` (captured before the
  prefill, valid at every position) plus greedy sampling, over N - 1; eager on the CPU.
- total s: prefill + decode; tokens/s: batch × N / total s (the prefill's first token counts).
- peak GB: the CUDA allocator's peak over the whole run of a model, weights and cache included.

Default N: the Transformer's KV cache is 2 · 4 KV heads · 128 · 2 bytes · 24 layers = 48 KiB
per token and sequence, so batch 128 × (2048 + 2048) positions take 25.8 GB, which fits an
80 GB H100 beside 2.4 GB of weights and the prefill's activations; the run prints the largest
N that would fit (it takes minutes per model to run).

    python experiments/bench/generate.py                       # the H100 run
    python experiments/bench/generate.py --batch 32 --gen 512  # any shape
    python experiments/bench/generate.py --quick --device cpu  # tiny models (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_device, time_once

from hybrid.config import ModelConfig
from hybrid.model import HybridLM
from hybrid.search.latency import layer_backends

HBM_BYTES = 80e9  # the card the default N is sized for
PATTERNS = {
    "Transformer": "*-" * 24,
    "Mamba-3 SISO": "M-" * 24,
    "Mamba-3 MIMO R=4": "M-" * 24,
    "Mamba-3:attention 5:1": "M-M-M-M-M-*-" * 4,
}


def configs(quick: bool) -> dict[str, ModelConfig]:
    if quick:
        width = {"d_model": 64, "vocab_size": 256, "swiglu": {"hidden": 128}}
        mamba = {"d_state": 16, "headdim": 16, "chunk_size": 16}
        attention = {"n_heads": 4, "n_kv_heads": 2}
        patterns = {name: pattern[:12] for name, pattern in PATTERNS.items()}
    else:
        width = {"d_model": 2048, "vocab_size": 32000, "swiglu": {"hidden": 5504}}
        mamba = {"d_state": 128, "headdim": 64}
        attention = {"n_heads": 16, "n_kv_heads": 4, "head_dim": 128}
        patterns = PATTERNS
    return {
        name: ModelConfig.from_pattern(
            pattern,
            **width,
            attention=attention,
            mamba3={**mamba, "mimo_rank": 4 if "MIMO" in name else 1},
        )
        for name, pattern in patterns.items()
    }


def largest_gen(config: ModelConfig, batch: int, prompt: int) -> int:
    """Tokens that fit beside the weights in HBM_BYTES, counting only weights and cache (the
    prefill's activations come on top: treat it as an upper bound)."""
    meta = HybridLM(config, device="meta")
    weights = 2 * sum(p.numel() for p in meta.parameters())
    per_position = batch * (meta.state_bytes(1) - meta.state_bytes(0))
    fixed = batch * meta.state_bytes(0)  # SSM states: independent of the length
    if per_position == 0:
        return -1  # no KV cache: the length does not bound memory
    return int((HBM_BYTES - weights - fixed) // per_position) - prompt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_model(
    name: str, config: ModelConfig, args: argparse.Namespace, device: torch.device
) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = HybridLM(config, device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt), device=device)
    cache = model.allocate_cache(args.batch, args.prompt + args.gen)
    step = model.graphed_step(cache, args.batch) if cuda else lambda t: model.step(t, cache)
    out = torch.empty(args.batch, args.gen, dtype=torch.long, device=device)
    holder: dict[str, torch.Tensor] = {}

    def prefill() -> None:
        cache.reset()
        holder["logits"] = model.forward_in_pieces(prompt, cache, args.prefill_piece)[:, -1]

    prefill()  # warm-up: kernel compilation and autotuning are not timed
    prefills = [time_once(prefill, device) for _ in range(args.repeats)]

    def decode() -> None:
        token = holder["logits"].argmax(-1)
        out[:, 0] = token
        for i in range(1, args.gen):
            token = step(token).argmax(-1)
            out[:, i] = token

    decode_ms = time_once(decode, device)
    sync(device)
    prefill_ms = statistics.median(prefills)
    total_s = (prefill_ms + decode_ms) / 1e3
    return {
        "model": name,
        "pattern": config.pattern,
        "params": model.num_params(non_embedding=False),
        "batch": args.batch,
        "prompt": args.prompt,
        "gen": args.gen,
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": decode_ms / max(1, args.gen - 1),
        "total_s": total_s,
        "tokens_per_s": args.batch * args.gen / total_s,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
        "graphed": cuda,
        "backends": layer_backends(config, device, dtype),
        "largest_gen_80gb": largest_gen(config, args.batch, args.prompt),
    }


def fmt(value: float | None, width: int, decimals: int) -> str:
    return f"{value:>{width}.{decimals}f}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--batch", type=int, help="sequences (default 128; quick 2)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 2048; quick 16)")
    parser.add_argument("--gen", type=int, help="generated tokens (default 2048; quick 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills (median)")
    parser.add_argument(
        "--prefill-piece", type=int, default=1 << 16,
        help="batch x tokens per prefill forward (default 65536; bounds activation memory)",
    )  # fmt: skip
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(PATTERNS)}")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    args = parser.parse_args(argv)
    defaults = (2, 16, 8) if args.quick else (128, 2048, 2048)
    for key, default in zip(("batch", "prompt", "gen"), defaults, strict=True):
        value = getattr(args, key) or default
        if value < 1:
            parser.error(f"--{key}={value} is invalid; allowed: a positive integer")
        setattr(args, key, value)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = configs(args.quick)
    if args.models:
        unknown = set(args.models.split(",")) - set(chosen)
        if unknown:
            parser.error(f"--models={args.models!r} is invalid; allowed: {', '.join(chosen)}")
        chosen = {name: chosen[name] for name in args.models.split(",")}
    print(
        f"device: {describe_device(device)}; batch {args.batch}, prompt {args.prompt}, "
        f"generate {args.gen}; random weights (timings only)"
    )
    rows = []
    for name, config in chosen.items():
        try:
            rows.append(run_model(name, config, args, device))
        except torch.OutOfMemoryError:
            print(f"{name}: out of memory at batch {args.batch} (try --batch or --prefill-piece)")
            torch.cuda.empty_cache()
    print(
        f"\n{'model':<24}{'params':>15}{'prefill ms':>12}{'decode ms/tok':>15}{'total s':>9}"
        f"{'tokens/s':>11}{'peak GB':>9}{'max N @80GB':>13}"
    )
    for r in rows:
        largest = r["largest_gen_80gb"] if r["largest_gen_80gb"] >= 0 else "any"
        print(
            f"{r['model']:<24}{r['params']:>15,}{r['prefill_ms']:>12.1f}"
            f"{r['decode_ms_per_token']:>15.3f}{r['total_s']:>9.2f}{r['tokens_per_s']:>11,.0f}"
            f"{fmt(r['peak_gb'], 9, 1)}{largest:>13}"
        )
    peer = next((r for r in rows if r["model"] == "Transformer"), None)
    for r in rows if peer else ():
        decode = peer["decode_ms_per_token"] / r["decode_ms_per_token"]
        print(
            f"{r['model']}: decode {decode:.2f}x, total {peer['total_s'] / r['total_s']:.2f}x "
            "the Transformer's speed"
        )
    for r in rows:
        print(f"{r['model']} backends: {r['backends']}")
    if args.out:
        args.out.write_text(json.dumps({"device": describe_device(device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
