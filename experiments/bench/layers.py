"""Per-layer prefill (forward, forward+backward) and decode-step times at a 1.5B-like width
(d_model 2048), with every layer compared in the same run: Mamba-3 SISO and MIMO R=4 on the
chunked PyTorch path and on the Triton scan, attention on the auto backend (FA4 on Hopper)
and on SDPA, SwiGLU.

Achieved TFLOP/s uses each layer's own `flops_per_token` (backward counted as 2× forward)
against the matmul rate measured in the same run; decode uses the bytes a step must move
(weights + state read + state written) against the measured copy bandwidth.

    python experiments/bench/layers.py            # the GPU run recorded in BENCHMARKS.md
    python experiments/bench/layers.py --quick    # small shapes, any device (smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_device, graphed_step_timing, measure_ceilings, time_ms

from hybrid.cache import KVCache
from hybrid.config import LayerSpec
from hybrid.kernels.mamba3_common import Mamba3State
from hybrid.layers import build
from hybrid.layers.attention import AttentionConfig, select_backend, select_decode_backend
from hybrid.layers.mamba3 import Mamba3Config
from hybrid.layers.swiglu import SwiGLUConfig


@dataclass(frozen=True)
class Setup:
    d_model: int
    prefill: tuple[tuple[int, int], ...]  # (batch, seq_len)
    decode: tuple[int, ...]  # batch sizes
    context: int
    specs: tuple[tuple[str, LayerSpec], ...]


def setup(quick: bool) -> Setup:
    if quick:
        mamba = {"d_state": 16, "headdim": 16, "chunk_size": 16}
        attn = {"n_heads": 4, "n_kv_heads": 2}
        d_model, prefill, decode, context, mlp = 64, ((2, 128),), (1, 4), 256, 128
    else:
        mamba = {"d_state": 128, "headdim": 64, "chunk_size": 64}
        attn = {"n_heads": 16, "n_kv_heads": 4}
        d_model, prefill, decode, context, mlp = 2048, ((4, 2048), (1, 8192)), (1, 64), 2048, 4096
    specs = (
        ("mamba3 SISO chunked", LayerSpec("mamba3", Mamba3Config(**mamba, backend="chunked"))),
        ("mamba3 SISO triton", LayerSpec("mamba3", Mamba3Config(**mamba))),
        (
            "mamba3 MIMO R=4 chunked",
            LayerSpec("mamba3", Mamba3Config(**mamba, mimo_rank=4, backend="chunked")),
        ),
        ("mamba3 MIMO R=4 triton", LayerSpec("mamba3", Mamba3Config(**mamba, mimo_rank=4))),
        ("attention auto", LayerSpec("attention", AttentionConfig(**attn))),
        ("attention sdpa", LayerSpec("attention", AttentionConfig(**attn, backend="sdpa"))),
        ("swiglu", LayerSpec("swiglu", SwiGLUConfig(hidden=mlp))),
    )
    return Setup(d_model, prefill, decode, context, specs)


def attention_head_dim(s: Setup) -> int:
    """The head dim of the setup's attention layers."""
    spec = next(spec for _, spec in s.specs if spec.kind == "attention")
    return spec.config.head_size(s.d_model)


def prefill_rows(layer, name, s: Setup, device, dtype, peak):
    rows = []
    for batch, seq in s.prefill:
        x = torch.randn(batch, seq, s.d_model, device=device, dtype=dtype)
        flops = layer.flops_per_token(seq) * batch * seq
        with torch.inference_mode():
            fwd = time_ms(lambda x=x: layer(x), device, reps=10)
        xg = x.detach().requires_grad_(True)

        def train(xg=xg):
            layer(xg).float().square().mean().backward()

        try:
            train_t = time_ms(train, device, warmup=2, reps=5)
        except torch.OutOfMemoryError:
            train_t = None
        layer.zero_grad(set_to_none=True)
        rows.append(
            {
                "layer": name,
                "batch": batch,
                "seq_len": seq,
                "fwd_ms": fwd.median_ms,
                "fwd_iqr": fwd.iqr_ms,
                "fwd_bwd_ms": train_t.median_ms if train_t else None,
                "fwd_tflops": flops / fwd.median_ms / 1e9,
                "fwd_pct_peak": 100 * flops / fwd.median_ms / 1e9 / peak.matmul_tflops,
                "fwd_bwd_tflops": 3 * flops / train_t.median_ms / 1e9 if train_t else None,
            }
        )
        del x, xg
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fill_with_history(cache, context: int) -> None:
    """Random state / a full KV cache of `context` random tokens: never time on zeros."""
    if isinstance(cache, Mamba3State):
        tensors = cache.tensors()
    elif isinstance(cache, KVCache):
        tensors = (cache.k, cache.v)
        cache.rewind(context)
    else:
        return
    for t in tensors:
        t.copy_(torch.randn(t.shape, device=t.device).to(t.dtype))


def decode_rows(layer, name, s: Setup, device, dtype, peak):
    rows = []
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    for batch in s.decode:
        cache = layer.allocate_cache(batch, s.context + 1, device=device, dtype=dtype)
        fill_with_history(cache, s.context)
        x = torch.randn(batch, s.d_model, device=device, dtype=dtype)

        def step(x=x, cache=cache):
            if isinstance(cache, KVCache):  # every timed step attends `context` past tokens
                cache.rewind(s.context)
            with torch.no_grad():
                layer.step(x, cache)

        eager = time_ms(step, device, reps=20)
        graphed = graphed_step_timing(step, device) if device.type == "cuda" else None
        best = graphed or eager
        state = layer.state_bytes(s.context, dtype) * batch
        # the SSM state is read and written back; a KV cache is only read
        moved = weight_bytes + state * (2 if isinstance(cache, Mamba3State) else 1)
        rows.append(
            {
                "layer": name,
                "batch": batch,
                "context": s.context,
                "eager_ms": eager.median_ms,
                "graph_ms": graphed.median_ms if graphed else None,
                "graph_iqr": graphed.iqr_ms if graphed else None,
                "bytes": moved,
                "gbs": moved / best.median_ms / 1e6,
                "pct_copy_bw": 100 * moved / best.median_ms / 1e6 / peak.copy_gbs,
            }
        )
    return rows


def fmt(value: float | None, width: int, decimals: int) -> str:
    return f"{value:>{width}.{decimals}f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    peak = measure_ceilings(device)
    s = setup(args.quick)
    print(f"device: {describe_device(device)}; {peak}; dtype {dtype}; d_model {s.d_model}")
    print(
        f"attention auto backend: prefill {select_backend('auto', device, dtype)}, "
        f"decode {select_decode_backend('auto', device, dtype, attention_head_dim(s))}"
    )
    prefill, decode = [], []
    for name, spec in s.specs:
        layer = build(spec, s.d_model, device=device, dtype=dtype)
        prefill += prefill_rows(layer, name, s, device, dtype, peak)
        decode += decode_rows(layer, name, s, device, dtype, peak)
        del layer

    print("\nprefill (median ms; TFLOP/s from flops_per_token, fwd+bwd = 3x fwd FLOPs)")
    print(
        f"{'layer':<17}{'B':>3}{'L':>7}{'fwd ms':>10}{'TFLOP/s':>9}{'%peak':>7}"
        f"{'fwd+bwd ms':>12}{'TFLOP/s':>9}"
    )
    for r in prefill:
        print(
            f"{r['layer']:<17}{r['batch']:>3}{r['seq_len']:>7}{r['fwd_ms']:>10.3f}"
            f"{r['fwd_tflops']:>9.1f}{r['fwd_pct_peak']:>7.1f}"
            f"{fmt(r['fwd_bwd_ms'], 12, 3)}{fmt(r['fwd_bwd_tflops'], 9, 1)}"
        )
    print(f"\ndecode step at context {s.context} (median ms; bytes = weights + state traffic)")
    print(
        f"{'layer':<17}{'B':>4}{'eager ms':>10}{'graph ms':>10}{'MB moved':>10}"
        f"{'GB/s':>8}{'%copy':>7}"
    )
    for r in decode:
        print(
            f"{r['layer']:<17}{r['batch']:>4}{r['eager_ms']:>10.3f}{fmt(r['graph_ms'], 10, 3)}"
            f"{r['bytes'] / 1e6:>10.2f}{r['gbs']:>8.0f}{r['pct_copy_bw']:>7.1f}"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": describe_device(device),
                    "matmul_tflops": peak.matmul_tflops,
                    "copy_gbs": peak.copy_gbs,
                    "prefill": prefill,
                    "decode": decode,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
