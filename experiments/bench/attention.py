"""Attention kernels alone: flash-attn-4 against torch SDPA, in the same run.

prefill: causal self-attention, 4k tokens, batch 8, bf16, head dim 128 (16 heads) and 64
  (32 heads): flash-attn-4 (`flash_attn.cute.flash_attn_func`) against each SDPA backend forced
  with `torch.nn.attention.sdpa_kernel` (flash, efficient, cudnn), forward and forward+backward.
  The forward is timed eagerly (each call's host launch cost included: flash-attn-4's Python
  launcher costs tens of microseconds) and as CUDA-graph replays (the kernel alone, as the
  model's latency objective runs it). TFLOP/s counts the causal FLOPs 4·B·H·L²·D / 2 for the
  forward and 3.5× that for forward+backward (backward = 2.5× forward, FlashAttention's
  convention), against the bf16 matmul rate measured in the run.
decode: one step of decode attention (one query per sequence, GQA 4:1) at context 2k/8k/32k
  and batch 1/16/128: the Triton split-KV kernel (`hybrid.kernels.attention_decode`, what the
  model runs on CUDA), flash-attn-4 reading `seqused_k` keys per sequence
  (`hybrid.layers.attention.fa4_decode`), SDPA over the whole cache buffer with a length mask
  (`sdpa_decode`; these three are valid in one CUDA graph at every position), and SDPA on keys
  sliced at a host length (valid for one position only). Timed as CUDA-graph
  replays; GB/s = K and V bytes read over time, against the copy bandwidth measured here.

A row that cannot run says why ("missing: ...", "unsupported: ...", "out of memory").

    python experiments/bench/attention.py           # the H100 run
    python experiments/bench/attention.py --quick   # tiny shapes, any device (smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Ceilings,
    describe_device,
    graphed_step_timing,
    measure_ceilings,
    time_ms,
    training_step,
)

from hybrid.cache import KVCache
from hybrid.graphs import capture_cuda_graph
from hybrid.kernels.attention_decode import split_kv_decode
from hybrid.layers.attention import (
    _import_fa4,
    _import_fa4_decode,
    fa4_decode,
    sdpa_decode,
    select_backend,
    select_decode_backend,
)

SDPA_BACKENDS = {
    "sdpa flash": SDPBackend.FLASH_ATTENTION,
    "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
}


@dataclass(frozen=True)
class Setup:
    prefill: tuple[tuple[int, int, int, int], ...]  # (batch, seq_len, heads, head_dim)
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    decode_heads: tuple[tuple[int, int, int], ...]  # (heads, kv_heads, head_dim)


def setup(quick: bool) -> Setup:
    if quick:
        return Setup(((2, 256, 4, 64),), (2,), (128, 512), ((4, 2, 64),))
    return Setup(
        ((8, 4096, 16, 128), (8, 4096, 32, 64)),
        (1, 16, 128),
        (2048, 8192, 32768),
        ((16, 4, 128), (32, 8, 64)),
    )


def failure(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    return f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def prefill_contestants(device: torch.device) -> dict[str, Callable | str]:
    """name -> fn(q, k, v) on (B, L, H, D) tensors, or why it cannot run here."""
    fa4 = _import_fa4()
    if device.type != "cuda":
        fa4 = "missing: needs CUDA"
    elif fa4 is None:
        fa4 = "missing: flash-attn-4 is not installed"
    else:
        fa4 = (lambda fn: lambda q, k, v: fn(q, k, v, causal=True)[0])(fa4)

    def sdpa(backend: SDPBackend) -> Callable:
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run

    return {"fa4": fa4, **{name: sdpa(b) for name, b in SDPA_BACKENDS.items()}}


def prefill_rows(s: Setup, device, dtype, peak: Ceilings) -> list[dict]:
    rows = []
    for batch, seq, heads, head_dim in s.prefill:
        flops = 4 * batch * heads * seq * seq * head_dim / 2
        shape = (batch, seq, heads, head_dim)
        for name, fn in prefill_contestants(device).items():
            row = {"kernel": name, "batch": batch, "seq_len": seq, "heads": heads}
            row |= {"head_dim": head_dim, "status": fn if isinstance(fn, str) else "ok"}
            rows.append(row)
            if isinstance(fn, str):
                continue
            try:
                # each kernel gets its native layout: (B, L, H, D) for FA4, (B, H, L, D) for SDPA
                native = (lambda t: t) if name == "fa4" else (lambda t: t.transpose(1, 2))
                q, k, v = (
                    native(torch.randn(shape, device=device, dtype=dtype)).contiguous()
                    for _ in range(3)
                )
                with torch.inference_mode():
                    forward = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)  # noqa: E731
                    fwd = time_ms(forward, device, reps=10)
                    fwd_graph = (  # no graphs elsewhere: the eager figure stands for both
                        time_ms(capture_cuda_graph(forward), device, reps=20)
                        if device.type == "cuda"
                        else fwd
                    )
                for t in (q, k, v):
                    t.requires_grad_(True)
                train = training_step(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
                train_t = time_ms(train, device, warmup=2, reps=5)
            except Exception as exc:  # a backend that cannot take this shape or device
                row["status"] = failure(exc)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row |= {
                "fwd_ms": fwd.median_ms,
                "fwd_iqr": fwd.iqr_ms,
                "fwd_tflops": flops / fwd.median_ms / 1e9,
                "fwd_graph_ms": fwd_graph.median_ms,
                "fwd_graph_tflops": flops / fwd_graph.median_ms / 1e9,
                "fwd_bwd_ms": train_t.median_ms,
                "fwd_bwd_tflops": 3.5 * flops / train_t.median_ms / 1e9,
            }
            row["fwd_pct_peak"] = 100 * row["fwd_tflops"] / peak.matmul_tflops
    return rows


def decode_contestants(device: torch.device, dtype: torch.dtype) -> dict[str, Callable | str]:
    """name -> fn(q (Bt, 1, H, D), cache) or why it cannot run here."""
    prefill, why = select_backend("auto", device, dtype)
    fa4 = fa4_decode if prefill == "fa4" and _import_fa4_decode() else f"missing: {why}"
    split_kv = (
        (lambda q, cache: split_kv_decode(q, cache.k, cache.v, cache.seqlens))
        if device.type == "cuda"
        else "missing: needs CUDA"
    )

    def sliced(q: torch.Tensor, cache: KVCache) -> torch.Tensor:
        n = cache.length
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), cache.k[:, :, :n], cache.v[:, :, :n], enable_gqa=True
        )

    return {
        "split-kv": split_kv,
        "fa4 seqused_k": fa4,
        "sdpa masked": sdpa_decode,
        "sdpa sliced": sliced,
    }


def decode_rows(s: Setup, device, dtype, peak: Ceilings) -> list[dict]:
    rows = []
    contestants = decode_contestants(device, dtype)
    for heads, kv_heads, head_dim in s.decode_heads:
        for batch in s.decode_batches:
            for context in s.contexts:
                kv_bytes = 2 * batch * kv_heads * context * head_dim * dtype.itemsize
                base = {"batch": batch, "context": context, "heads": heads}
                base |= {"kv_heads": kv_heads, "head_dim": head_dim, "kv_bytes": kv_bytes}
                try:
                    cache = KVCache.empty(
                        batch, kv_heads, context, head_dim, device=device, dtype=dtype
                    )
                    cache.k.normal_(), cache.v.normal_()
                    cache.rewind(context)
                    q = torch.randn(batch, 1, heads, head_dim, device=device, dtype=dtype)
                except torch.OutOfMemoryError as exc:
                    rows += [{"kernel": n, **base, "status": failure(exc)} for n in contestants]
                    continue
                for name, fn in contestants.items():
                    rows.append(decode_row(name, fn, q, cache, device, peak, base))
                del cache
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def decode_row(name, fn, q, cache, device, peak: Ceilings, base: dict) -> dict:
    row = {"kernel": name, **base, "status": fn if isinstance(fn, str) else "ok"}
    if isinstance(fn, str):
        return row
    try:
        with torch.inference_mode():

            def step(fn=fn):
                fn(q, cache)

            cuda = device.type == "cuda"
            t = graphed_step_timing(step, device) if cuda else time_ms(step, device, reps=5)
    except Exception as exc:  # e.g. a kernel that cannot be captured or take this shape
        return row | {"status": failure(exc)}
    gbs = base["kv_bytes"] / t.median_ms / 1e6
    return row | {"us": 1e3 * t.median_ms, "gbs": gbs, "pct_copy": 100 * gbs / peak.copy_gbs}


def fmt(value: float | None, width: int, decimals: int) -> str:
    return f"{value:>{width}.{decimals}f}" if value is not None else f"{'-':>{width}}"


def best_sdpa(rows: list[dict], row: dict, key: str, match: tuple[str, ...]) -> float | None:
    """The fastest SDPA time of `key` among rows of the same shape as `row`."""
    times = [
        r[key]
        for r in rows
        if r["kernel"].startswith("sdpa") and r.get(key) and all(r[m] == row[m] for m in match)
    ]
    return min(times) if times else None


def print_prefill(rows: list[dict]) -> None:
    print(
        "\nprefill, causal (median ms; TFLOP/s: fwd 4·B·H·L²·D/2, fwd+bwd 3.5× that; 'graph':"
        " the forward replayed from a CUDA graph, the kernels' own time without the host's"
        " launch cost, which the eager column includes)"
    )
    print(
        f"{'kernel':<16}{'B':>3}{'L':>6}{'H':>4}{'D':>5}{'fwd ms':>9}{'TFLOP/s':>9}"
        f"{'graph ms':>10}{'TFLOP/s':>9}{'%peak':>7}{'fwd+bwd ms':>12}{'TFLOP/s':>9}  status"
    )
    match = ("batch", "seq_len", "heads", "head_dim")
    for r in rows:
        print(
            f"{r['kernel']:<16}{r['batch']:>3}{r['seq_len']:>6}{r['heads']:>4}{r['head_dim']:>5}"
            f"{fmt(r.get('fwd_ms'), 9, 3)}{fmt(r.get('fwd_tflops'), 9, 1)}"
            f"{fmt(r.get('fwd_graph_ms'), 10, 3)}{fmt(r.get('fwd_graph_tflops'), 9, 1)}"
            f"{fmt(r.get('fwd_pct_peak'), 7, 1)}{fmt(r.get('fwd_bwd_ms'), 12, 3)}"
            f"{fmt(r.get('fwd_bwd_tflops'), 9, 1)}  {r['status']}"
        )
    keys = ("fwd_ms", "fwd_graph_ms", "fwd_bwd_ms")
    for r in rows:
        if r["kernel"] == "fa4" and r.get("fwd_ms"):
            fwd, graph, train = (best_sdpa(rows, r, k, match) for k in keys)
            print(
                f"FA4 speed-up over the best SDPA at B={r['batch']} H={r['heads']} "
                f"D={r['head_dim']}: fwd {fwd / r['fwd_ms']:.2f}x eager, "
                f"{graph / r['fwd_graph_ms']:.2f}x graphed, "
                f"fwd+bwd {train / r['fwd_bwd_ms']:.2f}x"
                if fwd and graph and train
                else "no SDPA backend ran this shape"
            )


def print_decode(rows: list[dict]) -> None:
    print("\ndecode, one query per sequence (median µs of graph replays; GB/s = K+V read)")
    print(
        f"{'kernel':<15}{'B':>5}{'ctx':>7}{'H/Hkv':>7}{'D':>5}{'µs':>10}{'GB/s':>8}{'%copy':>7}"
        "  status"
    )
    for r in rows:
        heads = f"{r['heads']}/{r['kv_heads']}"
        print(
            f"{r['kernel']:<15}{r['batch']:>5}{r['context']:>7}"
            f"{heads:>7}{r['head_dim']:>5}{fmt(r.get('us'), 10, 1)}"
            f"{fmt(r.get('gbs'), 8, 0)}{fmt(r.get('pct_copy'), 7, 1)}  {r['status']}"
        )
    match = ("batch", "context", "heads", "head_dim")

    def same_shape(kernel: str, r: dict) -> float | None:
        return next(
            (
                x["us"]
                for x in rows
                if x["kernel"] == kernel and x.get("us") and all(x[m] == r[m] for m in match)
            ),
            None,
        )

    for r in rows:
        if r["kernel"] == "split-kv" and r.get("us"):
            peers = {p: same_shape(p, r) for p in ("fa4 seqused_k", "sdpa masked")}
            best = best_sdpa(rows, r, "us", match)
            print(
                f"split-KV speed-up at B={r['batch']} ctx={r['context']} "
                f"H={r['heads']}/{r['kv_heads']} D={r['head_dim']}: "
                + ", ".join(f"over {p} {fmt(t and t / r['us'], 0, 2)}x" for p, t in peers.items())
                + f", over the best SDPA {fmt(best and best / r['us'], 0, 2)}x"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    peak = measure_ceilings(device)
    s = setup(args.quick)
    prefill_backend = select_backend("auto", device, dtype)
    decode_backend = {
        d: select_decode_backend("auto", device, dtype, d) for _, _, d in s.decode_heads
    }
    print(f"device: {describe_device(device)}; {peak}; dtype {dtype}")
    print(f"model's attention backends: prefill {prefill_backend}, decode {decode_backend}")
    prefill = prefill_rows(s, device, dtype, peak)
    decode = decode_rows(s, device, dtype, peak)
    print_prefill(prefill)
    print_decode(decode)
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": describe_device(device),
                    "dtype": str(dtype),
                    "matmul_tflops": peak.matmul_tflops,
                    "copy_gbs": peak.copy_gbs,
                    "backends": {"prefill": prefill_backend, "decode": decode_backend},
                    "prefill": prefill,
                    "decode": decode,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
