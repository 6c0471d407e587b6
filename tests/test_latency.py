"""Latency measurement: CPU tagging, the cache (hits, misses, keys by device and versions),
the refusal to mix devices in a study, YAML options, and `hybrid bench`."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from helpers import TINY_MODEL_ARGS
from test_search_space import _set, _text

import hybrid.search.latency as latency
from hybrid.cli import main
from hybrid.config import ModelConfig
from hybrid.model import HybridLM
from hybrid.search.latency import FileLatencyCache, LatencyRequest, measure
from hybrid.search.space import SpaceError, parse_space
from hybrid.search.study import claim_latency_device

CPU = torch.device("cpu")
CONFIG = ModelConfig.from_pattern(
    "M-*-", d_model=32, mamba3={"d_state": 16, "headdim": 16}, attention={"n_heads": 2}
)


@pytest.fixture
def counted(monkeypatch):
    """Count the timing rounds actually run (a cache hit runs none)."""
    calls = []
    real = latency._rounds

    def rounds(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(latency, "_rounds", rounds)
    return calls


def test_cpu_measurements_are_tagged_and_float32():
    for kind, length in (("prefill", 32), ("decode", 48)):
        m = measure(CONFIG, LatencyRequest(kind, 2, length, "bfloat16"), CPU, repeats=5)
        assert m.device.startswith("cpu") and m.dtype == "float32" and not m.graphed
        assert m.median_ms > 0 and m.iqr_ms >= 0 and 1 <= m.rounds <= 3
        assert m.spread == pytest.approx(m.iqr_ms / m.median_ms)
        assert set(m.backends) == {"mamba3", "attention", "projections", "chaining"}
        assert m.versions["torch"] and m.backends["projections"] == "F.linear (device is cpu)"
        assert m.backends["chaining"] == "none (device is cpu)"


def test_cache_hits_misses_and_keys(tmp_path, counted, monkeypatch):
    cache = FileLatencyCache(tmp_path / "latency.json")
    request = LatencyRequest("decode", 1, 40)
    first = measure(CONFIG, request, CPU, cache=cache, repeats=5)
    assert len(counted) == 1
    assert measure(CONFIG, request, CPU, cache=cache) == first and len(counted) == 1  # hit
    measure(CONFIG, LatencyRequest("decode", 1, 41), CPU, cache=cache, repeats=5)
    assert len(counted) == 2  # another context is another key
    monkeypatch.setattr(latency, "device_name", lambda d: "NVIDIA H100 80GB HBM3")
    measure(CONFIG, request, CPU, cache=cache, repeats=5)
    assert len(counted) == 3  # never shared across device types
    monkeypatch.setattr(latency, "software_versions", lambda: {"torch": "9.9"})
    measure(CONFIG, request, CPU, cache=cache, repeats=5)
    assert len(counted) == 4  # nor across software versions
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 4


def test_decode_at_a_long_context_is_prefilled_in_pieces(monkeypatch):
    monkeypatch.setattr(latency, "PREFILL_PIECE_TOKENS", 64)
    seen = []
    real = HybridLM.forward

    def forward(self, tokens, cache=None, **kwargs):
        seen.append(tokens.shape)
        return real(self, tokens, cache, **kwargs)

    monkeypatch.setattr(HybridLM, "forward", forward)
    measure(CONFIG, LatencyRequest("decode", 2, 100), CPU, repeats=3)
    assert seen[:4] == [torch.Size([2, 32])] * 3 + [torch.Size([2, 4])]


def test_prefill_is_timed_as_a_generation_prefill(monkeypatch):
    """Time to first token: every timed call fills the cache from position 0 (Mamba-3 states
    marked empty, as in a fresh cache) and takes the head on the last position only (no
    tokens × vocab logits)."""
    calls = []
    real = HybridLM.forward

    def forward(self, tokens, cache=None, **kwargs):
        start = cache.seqlen if cache is not None else None
        empty = cache is not None and cache.layers[0].empty  # the Mamba-3 layer's state
        logits = real(self, tokens, cache, **kwargs)
        end = cache.seqlen if cache is not None else None
        calls.append((tokens.shape, start, empty, end, kwargs.get("last_only"), logits.shape))
        return logits

    monkeypatch.setattr(HybridLM, "forward", forward)
    measure(CONFIG, LatencyRequest("prefill", 2, 24), CPU, repeats=3)
    assert len(calls) >= 5  # warm-up and samples
    assert set(calls) == {(torch.Size([2, 24]), 0, True, 24, True, (2, 1, CONFIG.vocab_size))}


def test_a_study_refuses_latencies_from_another_device():
    space = parse_space(
        _text(
            _set(
                "objectives",
                [{"metric": "val_perplexity"}, {"metric": "decode_latency_ms", "context": 64}],
            )
        )
    )
    study = optuna.create_study(directions=space.directions)
    claim_latency_device(study, space, CPU)
    assert study.user_attrs["latency_device"].startswith("cpu")
    claim_latency_device(study, space, CPU)  # the same device: fine
    study.set_user_attr("latency_device", "NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match="latencies of two devices never share a front"):
        claim_latency_device(study, space, CPU)


def test_latency_objective_options_and_errors():
    good = parse_space(
        _text(
            _set(
                "objectives",
                [
                    {"metric": "val_perplexity"},
                    {
                        "metric": "peak_memory_bytes",
                        "batch": 8,
                        "context": 4096,
                        "max_spread": 0.05,
                    },
                    {"metric": "prefill_latency_ms", "prompt_len": 1024, "dtype": "float16"},
                ],
            )
        )
    )
    assert good.spec.objectives[1].max_spread == 0.05
    for objective, path in (
        ({"metric": "decode_latency_ms", "dtype": "int8"}, "objectives[1].dtype"),
        ({"metric": "decode_latency_ms", "batch": 0}, "objectives[1].batch"),
        ({"metric": "decode_latency_ms", "max_spread": 0}, "objectives[1].max_spread"),
    ):
        with pytest.raises(SpaceError) as error:
            parse_space(_text(_set("objectives", [{"metric": "val_perplexity"}, objective])))
        assert any(p.startswith(path) for p in error.value.problems), error.value.problems


def test_bench_model_and_sweep_print_tables(tmp_path, capsys):
    args = TINY_MODEL_ARGS
    assert (
        main(
            [
                "bench",
                "model",
                *args,
                "--batch",
                "1",
                "--batch",
                "2",
                "--context",
                "32",
                "--prompt-len",
                "16",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "device: cpu" in out and out.count("M-*-") == 2
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 32), (2, 32)]
    space = tmp_path / "s.yaml"
    space.write_text(
        _text(_set("model.d_model", 32)).replace(
            "d_state: 16, headdim: 16", "d_state: 16, headdim: 16"
        )
    )
    assert main(["bench", "sweep", str(space), "--context", "24", "--prompt-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "M-M-M-M- mimo_rank=1" in out and "mimo_rank=2" in out


def test_bench_header_names_every_layer_kinds_paths():
    """A sweep's first architecture may lack attention: the header merges all rows' paths."""
    from hybrid.search.bench import merged_backends

    rows = [
        {"backends": {"mamba3": "triton scan / cute step"}},
        {"backends": {"mamba3": "triton scan / cute step", "attention": "fa4 / split-kv"}},
        {"backends": {"mamba3": "chunked scan / torch step"}},
    ]
    assert merged_backends(rows) == {
        "mamba3": "triton scan / cute step | chunked scan / torch step",
        "attention": "fa4 / split-kv",
    }
