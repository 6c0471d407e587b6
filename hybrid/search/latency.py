"""Prefill and decode latency of an architecture on the device this process owns.

prefill: one forward of batch × prompt_len tokens; decode: one `step` per token after a
prefill to `context` tokens. Warm-up first, then the median of repeated timings (CUDA events
on a GPU, a monotonic clock on the CPU) with the interquartile range beside it. Every figure
carries the device it was measured on, so CPU and GPU latencies are never mixed. On the CPU
models run in float32 whatever dtype is asked (CPU bf16 timings say nothing about a GPU).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

from hybrid.config import ModelConfig
from hybrid.model import HybridLM

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    device: str
    dtype: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _timed(fn, device: torch.device) -> float:
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


def _summary(samples: list[float], device: torch.device, dtype: torch.dtype) -> Latency:
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return Latency(
        statistics.median(samples), q3 - q1, device_name(device), str(dtype).removeprefix("torch.")
    )


def _model(config: ModelConfig, device: torch.device, dtype: str) -> tuple[HybridLM, torch.dtype]:
    torch_dtype = DTYPES[dtype] if device.type == "cuda" else torch.float32
    return HybridLM(config, device=device, dtype=torch_dtype).eval(), torch_dtype


@torch.inference_mode()
def prefill_latency(
    config: ModelConfig,
    batch: int,
    prompt_len: int,
    device: torch.device,
    dtype: str = "bfloat16",
    warmup: int = 2,
    repeats: int = 7,
) -> Latency:
    model, torch_dtype = _model(config, device, dtype)
    tokens = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
    for _ in range(warmup):
        model(tokens)
    samples = [_timed(lambda: model(tokens), device) for _ in range(repeats)]
    return _summary(samples, device, torch_dtype)


@torch.inference_mode()
def decode_latency(
    config: ModelConfig,
    batch: int,
    context: int,
    device: torch.device,
    dtype: str = "bfloat16",
    warmup: int = 3,
    repeats: int = 15,
) -> Latency:
    """Milliseconds per generated token (one `step` of every sequence in the batch)."""
    model, torch_dtype = _model(config, device, dtype)
    prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)
    _, cache = model.prefill(prompt, max_seqlen=context + warmup + repeats)
    token = torch.randint(0, config.vocab_size, (batch,), device=device)
    for _ in range(warmup):
        model.step(token, cache)
    samples = [_timed(lambda: model.step(token, cache), device) for _ in range(repeats)]
    return _summary(samples, device, torch_dtype)
