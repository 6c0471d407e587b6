"""`hybrid bench model` and `hybrid bench sweep`: the cost side of architectures (prefill and
decode latency, peak memory, state bytes, achieved decode bandwidth) without training."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from hybrid.config import ModelConfig
from hybrid.corpora import cache_dir
from hybrid.model import HybridLM
from hybrid.search.latency import (
    DTYPES,
    FileLatencyCache,
    LatencyRequest,
    copy_bandwidth_gbs,
    measure,
)

if TYPE_CHECKING:  # `hybrid bench model` needs no search-space machinery (pydantic)
    from hybrid.search.space import SearchSpace


def bench_rows(
    configs: Iterable[tuple[str, ModelConfig]],
    batches: list[int],
    contexts: list[int],
    prompt_len: int,
    dtype: str,
    device: torch.device,
    use_cache: bool = True,
) -> list[dict[str, Any]]:
    """One row per (architecture, batch, context): prefill and decode latency, peak memory,
    and the decode step's bytes (every weight and cache byte once) per second."""
    cache = FileLatencyCache(cache_dir() / "latency.json") if use_cache else None
    measured = DTYPES[dtype] if device.type == "cuda" else torch.float32  # the CPU: float32
    itemsize = torch.empty((), dtype=measured).element_size()
    rows, configs = [], list(configs)
    bar = tqdm(  # a sweep measures for minutes before its table: say how far it is
        total=len(configs) * len(batches) * (1 + len(contexts)),
        desc="bench",
        unit="measurement",
        disable=len(configs) * len(batches) * len(contexts) <= 1,
        dynamic_ncols=True,
    )
    for label, config in configs:
        meta = HybridLM(config, device="meta")
        weights = sum(p.numel() for p in meta.parameters()) * itemsize
        for batch in batches:
            bar.set_postfix_str(f"{label[:40]} B={batch}", refresh=False)
            prefill = measure(
                config, LatencyRequest("prefill", batch, prompt_len, dtype), device, cache=cache
            )
            bar.update(1)
            for context in contexts:
                decode = measure(
                    config, LatencyRequest("decode", batch, context, dtype), device, cache=cache
                )
                bar.update(1)
                state = meta.state_bytes(context, measured) * batch
                rows.append(
                    {
                        "model": label,
                        "pattern": config.pattern,
                        "params": meta.num_params(),
                        "batch": batch,
                        "context": context,
                        "prompt_len": prompt_len,
                        "prefill_ms": prefill.median_ms,
                        "prefill_spread": prefill.spread,
                        "decode_ms": decode.median_ms,
                        "decode_spread": decode.spread,
                        "peak_memory_bytes": decode.peak_memory_bytes,
                        "state_bytes": state,
                        "decode_gbs": (weights + state) / decode.median_ms / 1e6,
                        "graphed": decode.graphed,
                        "device": decode.device,
                        "sm_clock_mhz": decode.sm_clock_mhz,
                        "backends": decode.backends,
                        "decode_record": asdict(decode),
                        "prefill_record": asdict(prefill),
                    }
                )
    bar.close()
    return rows


def print_rows(rows: list[dict[str, Any]], device: torch.device) -> None:
    copy = copy_bandwidth_gbs(device)
    first = rows[0]
    print(
        f"device: {first['device']}  SM clock: {first['sm_clock_mhz'] or '-'} MHz  "
        f"copy bandwidth: {copy:,.0f} GB/s  backends: {merged_backends(rows)}"
    )
    header = (
        f"{'model':<36}{'params':>12}{'B':>5}{'ctx':>7}{'prefill ms':>12}{'±%':>6}"
        f"{'decode ms':>11}{'±%':>6}{'peak MB':>9}{'state MB':>10}{'GB/s':>8}{'%copy':>7}"
    )
    print(header)
    for r in rows:
        peak = r["peak_memory_bytes"] / 1e6 if r["peak_memory_bytes"] is not None else float("nan")
        print(
            f"{r['model'][:35]:<36}{r['params']:>12,}{r['batch']:>5}{r['context']:>7}"
            f"{r['prefill_ms']:>12.3f}{100 * r['prefill_spread']:>6.1f}"
            f"{r['decode_ms']:>11.4f}{100 * r['decode_spread']:>6.1f}{peak:>9.1f}"
            f"{r['state_bytes'] / 1e6:>10.2f}{r['decode_gbs']:>8.0f}"
            f"{100 * r['decode_gbs'] / copy:>7.1f}"
        )


def merged_backends(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per layer kind, every distinct prefill/decode path the rows ran, joined by " | " (a
    sweep's first architecture may have no attention layer)."""
    paths: dict[str, list[str]] = {}
    for row in rows:
        for kind, path in row["backends"].items():
            if path not in paths.setdefault(kind, []):
                paths[kind].append(path)
    return {kind: " | ".join(kind_paths) for kind, kind_paths in paths.items()}


def space_architectures(space: SearchSpace) -> list[tuple[str, ModelConfig]]:
    """Every distinct architecture of the space's model grid (sampled when large)."""
    seen: dict[str, tuple[str, ModelConfig]] = {}
    for point in space.points():
        try:
            plan = space.plan(point)
        except ValueError:
            continue
        key = json.dumps(plan.model.to_dict(), sort_keys=True)
        label = " ".join(
            f"{p.rsplit('.', 1)[-1]}={v}"
            for p, v in point.items()
            if p.startswith("model.") and p in space.dimensions and not p.startswith("model.layout")
        )
        seen.setdefault(key, (f"{plan.pattern} {label}".strip(), plan.model))
    return sorted(seen.values(), key=lambda item: (item[1].attention_ratio, item[0]))


def write_json(rows: list[dict[str, Any]], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(rows, indent=1, default=str))
