"""Latency and memory of an architecture, measured on the device this process owns.

- prefill: what a generation's prefill computes (time to first token): one forward of batch ×
  prompt_len tokens (inference mode; bf16 on CUDA) that fills a preallocated inference cache
  (attention's keys and values, Mamba-3's final state) and takes the head on the last
  position only. Logits for every position would add a (batch·prompt_len × vocab) product and
  output that no architecture choice changes (at batch 64 × 512 and a vocab of 32k, ~2 GB of
  logits in bf16), diluting the differences a search compares and filling the memory peak.
  Captured in a CUDA graph on CUDA: launch overhead is host time that varies from process to
  process (87% between 5 processes at batch 1 when timed eagerly on an H100), not the
  architecture's.
- decode: one `step` of every layer, the cache update and the head, per generated token, after
  a prefill to `context` tokens (run in pieces of 32k batch × tokens, so long contexts fit).
  On CUDA the whole step is captured in a CUDA graph and its replays are timed (the SSM state
  and the static KV cache are preallocated and updated in place: the replays are the real
  step).
- peak_memory_bytes: the most memory the prefill + decode used (CUDA allocator peak; on the CPU
  the growth of the process's peak resident set, a lower bound where freed memory is reused).

Method: warm-up, then `repeats` timings (CUDA events; a monotonic clock on the CPU), median
and interquartile range. If the spread (IQR / median) is above `max_spread` the round is
repeated, up to `max_rounds`, keeping the tightest; the spread is recorded either way, with
the GPU name, its SM clock, the dtype, the versions and the backend of every layer kind.
On the CPU models run in float32 whatever dtype is asked (CPU bf16 timings say nothing about
a GPU) and every record says `device=cpu ...`. Results are cached by (architecture, request,
device, software versions), so two trials of one architecture are measured once and a cache
never crosses GPU types.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

import hybrid
from hybrid.cache import InferenceCache, KVCache
from hybrid.config import ModelConfig
from hybrid.devices import on_device
from hybrid.graphs import capture_cuda_graph
from hybrid.kernels.dependent_launch import planned as planned_chaining
from hybrid.kernels.mamba3_decode import planned_decode_backend
from hybrid.kernels.mamba3_scan import planned_scan_backend
from hybrid.kernels.small_batch_linear import planned_backend as planned_projection_backend
from hybrid.layers.attention import select_backend, select_decode_backend
from hybrid.model import HybridLM

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REPLAYS_PER_SAMPLE = 10  # decode graph replays timed together, so one sample is >> timer noise
PREFILL_PIECE_TOKENS = 1 << 15  # tokens per forward when filling a decode context


@dataclass(frozen=True)
class LatencyRequest:
    kind: Literal["prefill", "decode"]
    batch: int
    length: int  # prompt_len for prefill, context for decode
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    iqr_ms: float
    spread: float  # iqr / median of the kept (tightest) round
    rounds: int  # rounds run
    samples: int
    peak_memory_bytes: int | None
    device: str
    dtype: str
    graphed: bool
    sm_clock_mhz: int | None = None
    backends: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def package_versions(packages: tuple[str, ...], absent: str | None = None) -> dict[str, str]:
    """Installed versions of `packages`; missing ones are left out, or given as `absent`.
    hybrid-arch's is the running source's (`hybrid.__version__`): an editable install's
    metadata keeps the version it was installed at."""
    out = {}
    for package in packages:
        if package == "hybrid-arch":
            out[package] = hybrid.__version__
            continue
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if absent is not None:
                out[package] = absent
    return out


def software_versions() -> dict[str, str]:
    """What a latency depends on, besides the architecture and the device."""
    return {
        "torch": torch.__version__,
        **package_versions(("triton", "hybrid-arch", "nvidia-cutlass-dsl", "flash-attn-4")),
    }


def cache_key(config: ModelConfig, request: LatencyRequest, device: torch.device) -> str:
    """Architecture × request × device × software: what a latency depends on."""
    blob = json.dumps(
        {
            "model": config.to_dict(),
            "request": asdict(request),
            "device": device_name(device),
            "versions": software_versions(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class LatencyCache(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, value: dict[str, Any]) -> None: ...


class FileLatencyCache:
    """A JSON file of measurements (for `hybrid bench`), rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._load().get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        data = self._load()
        data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False) as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, self.path)


class StudyLatencyCache:
    """Measurements kept in the study's own storage, shared by all of its workers."""

    def __init__(self, study: Any) -> None:
        self.study = study

    def get(self, key: str) -> dict[str, Any] | None:
        return self.study.user_attrs.get(f"latency:{key}")

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.study.set_user_attr(f"latency:{key}", value)


def _sm_clock(device: torch.device) -> int | None:
    try:
        return int(torch.cuda.clock_rate(device))
    except Exception:  # needs NVML; absent on some hosts
        return None


def layer_backends(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Per layer kind, the prefill and decode backends a model of this config runs, as the
    dispatchers would pick them (printed by `hybrid bench`, stored with every record), and
    the projections' (every block's in and out projections and the head)."""
    kinds = {spec.kind for spec in config.layers}
    out = {}
    if "mamba3" in kinds:
        configs = [s.config for s in config.layers if s.kind == "mamba3"]
        cuda = device.type == "cuda"
        scan = sorted(
            {
                planned_scan_backend(
                    c.backend, cuda, c.headdim, c.d_state, c.mimo_rank, dtype, c.chunk_tokens
                )
                for c in configs
            }
        )
        step = sorted(
            {
                planned_decode_backend(c.decode_backend, cuda, c.headdim, c.d_state, c.mimo_rank)
                for c in configs
            }
        )
        out["mamba3"] = f"{'|'.join(scan)} scan / {'|'.join(step)} step"
    if "attention" in kinds:
        requested = {
            (s.config.backend, s.config.head_size(config.d_model))
            for s in config.layers
            if s.kind == "attention"
        }
        out["attention"] = " | ".join(
            "{} prefill ({}) / {} decode ({})".format(
                *select_backend(r, device, dtype), *select_decode_backend(r, device, dtype, d)
            )
            for r, d in sorted(requested)
        )
    out["projections"] = planned_projection_backend(device)
    out["chaining"] = planned_chaining(device)
    return out


class _PeakMemory:
    """Peak bytes used inside the block: CUDA allocator peak, or on Linux the peak resident
    set (VmHWM, reset through /proc/self/clear_refs) above the resident set at entry."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = self._reset_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.bytes = max(0, self._status("VmHWM") - self.base)

    @staticmethod
    def _status(field_name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field_name)

    def _reset_rss(self) -> int | None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return self._status("VmRSS")
        except OSError:
            return None


def _time(
    fn: Callable[[], Any], device: torch.device, n: int, reset: Callable[[], Any] | None = None
) -> float:
    """Milliseconds of n calls of fn, after an untimed `reset`."""
    if reset is not None:
        reset()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3


def _rounds(
    fn: Callable[[], Any],
    device: torch.device,
    per_sample: int,
    repeats: int,
    max_spread: float,
    max_rounds: int,
    reset: Callable[[], Any] | None,
) -> tuple[float, float, float, int]:
    """(median, IQR, spread) of the tightest of up to max_rounds rounds, and rounds run; each
    sample starts from an untimed `reset`."""
    best, rounds = None, 0
    while rounds < max_rounds and (best is None or best[2] > max_spread):
        rounds += 1
        samples = [_time(fn, device, per_sample, reset) / per_sample for _ in range(repeats)]
        q1, _, q3 = statistics.quantiles(samples, n=4)
        median = statistics.median(samples)
        if best is None or (q3 - q1) / median < best[2]:
            best = (median, q3 - q1, (q3 - q1) / median)
    return (*best, rounds)


def _empty_positions(cache: InferenceCache) -> None:
    """Count `cache` as holding no tokens again, on the host only (no kernel enters a timed
    graph): a prefill writes its keys and values at host offsets, so each replay of its graph
    rewrites the same positions; Mamba-3 states are marked empty, so the prefill runs as one
    into a fresh cache does (their contents, left by the previous replay, are not read)."""
    cache.seqlen = 0
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            layer.length = 0
        elif layer is not None:
            layer.empty = True


def _prefill_in_pieces(model: HybridLM, tokens: torch.Tensor, max_seqlen: int) -> Any:
    """Prefill the cache to the whole context, PREFILL_PIECE_TOKENS (batch × length) at a
    time, so a long context at a large batch fits in memory (the result is the same)."""
    cache = model.allocate_cache(tokens.shape[0], max_seqlen)
    model.forward_in_pieces(tokens, cache, PREFILL_PIECE_TOKENS)
    return cache


@torch.inference_mode()
def measure(
    config: ModelConfig,
    request: LatencyRequest,
    device: torch.device,
    *,
    cache: LatencyCache | None = None,
    max_spread: float = 0.03,
    max_rounds: int = 3,
    repeats: int | None = None,
    graphs: bool = True,
) -> Measurement:
    """Measure (or fetch from `cache`) one latency of one architecture."""
    key = cache_key(config, request, device)
    if cache is not None and (hit := cache.get(key)) is not None:
        return Measurement(**hit)
    cuda = device.type == "cuda"
    dtype = DTYPES[request.dtype] if cuda else torch.float32
    repeats = repeats or (30 if cuda else 9)
    torch.manual_seed(0)
    with on_device(device), _PeakMemory(device) as peak:
        model = HybridLM(config, device=device, dtype=dtype).eval()
        tokens = torch.randint(0, config.vocab_size, (request.batch, request.length), device=device)
        graphed = cuda and graphs
        if request.kind == "prefill":
            filled = model.allocate_cache(request.batch, request.length)

            def work() -> None:
                _empty_positions(filled)
                model(tokens, filled, last_only=True)

            reset = None  # a prefill writes at host offsets: nothing to rewind on the device
            per_sample = 1
        else:
            per_sample = REPLAYS_PER_SAMPLE if graphed else 1
            kv = _prefill_in_pieces(model, tokens, max_seqlen=request.length + per_sample)
            token = tokens[:, -1].clone()

            def work() -> None:
                model.step(token, kv)

            def reset() -> None:
                # a sample's steps attend length + 1, + 2, ... tokens; the rewind (a kernel per
                # attention layer that a real step does not run) stays out of the timing
                kv.rewind(request.length)

        timed = capture_cuda_graph(work) if graphed else work
        for _ in range(2):
            _time(timed, device, 1, reset)
        stats = _rounds(timed, device, per_sample, repeats, max_spread, max_rounds, reset)
        if cuda:
            torch.cuda.synchronize(device)
    median, iqr, spread, rounds = stats
    result = Measurement(
        median_ms=median,
        iqr_ms=iqr,
        spread=spread,
        rounds=rounds,
        samples=repeats,
        peak_memory_bytes=peak.bytes,
        device=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        graphed=graphed,
        sm_clock_mhz=_sm_clock(device) if cuda else None,
        backends=layer_backends(config, device, dtype),
        versions=software_versions(),
    )
    if cache is not None:
        cache.put(key, asdict(result))
    return result


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy rate (bytes read + written), the yardstick for decode."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = min(_time(lambda: dst.copy_(src), device, 5) / 5 for _ in range(3))
    return 2 * src.nbytes / ms / 1e6
