"""The attention, generation and prefill benchmarks run end to end in their --quick mode on
the CPU (rows that need CUDA or flash-attn-4 say so instead of failing) and write their
JSON; the kernel-resource report compiles offline."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_attention_bench_quick_on_cpu(tmp_path, capsys):
    _bench("attention").main(["--quick", "--device", "cpu", "--out", str(tmp_path / "a.json")])
    result = json.loads((tmp_path / "a.json").read_text())
    fa4 = [r for r in result["prefill"] + result["decode"] if r["kernel"].startswith("fa4")]
    assert fa4 and all(r["status"].startswith("missing") for r in fa4)
    assert any(r["kernel"] == "sdpa masked" and r["us"] > 0 for r in result["decode"])
    assert "sdpa flash" in capsys.readouterr().out


def test_generate_bench_quick_on_cpu(tmp_path):
    _bench("generate").main(["--quick", "--device", "cpu", "--out", str(tmp_path / "g.json")])
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [
        "Transformer",
        "Mamba-3 SISO",
        "Mamba-3 MIMO R=4",
        "Mamba-3:attention 5:1",
    ]
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)


def test_prefill_bench_quick_on_cpu(tmp_path):
    _bench("prefill").main(["--quick", "--device", "cpu", "--out", str(tmp_path / "p.json")])
    rows = {r["kernel"]: r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    for name in ("chunked PyTorch SISO", "torch SDPA causal"):
        assert rows[name]["fwd_ms"] > 0 and rows[name]["fwd_bwd_ms"] > 0, rows[name]
    assert rows["ours SISO (op)"]["note"] == "needs CUDA"


def test_kernel_resources_compile_every_training_kernel_offline(tmp_path):
    """No GPU: each scan kernel compiles for sm_90 and its cubin reports registers within the
    architecture's 255, shared memory within an H100's, and at least one CTA per SM."""
    _bench("kernel_resources").main(["--ranks", "1", "--out", str(tmp_path / "k.json")])
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} >= {"chunk gradient", "state pass", "B/C rotation"}
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["shared_kb"] <= 227 and r["ctas_per_sm"] >= 1, r


def test_generate_bench_names_a_bad_model():
    with pytest.raises(SystemExit):
        _bench("generate").main(["--quick", "--device", "cpu", "--models", "GPT"])


def test_issue_time_is_measured_on_the_cpu():
    """`issue_ms` (the prefill bench's host column) times the host side of a call."""
    import torch

    common = _bench("common")
    x = torch.randn(256, 256)
    assert common.issue_ms(lambda: x @ x, torch.device("cpu")) > 0


def test_training_step_returns_gradients_without_accumulating():
    """The benches' forward+backward leaves every .grad untouched and returns the gradients
    a single backward gives (a repeated .backward() would add into .grad on every call)."""
    import torch

    common = _bench("common")
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    frozen = torch.randn(8)
    torch.manual_seed(3)
    step = common.training_step(lambda: torch.tanh(x @ w) * frozen)
    first, second = step(), step()
    assert w.grad is None and x.grad is None
    torch.manual_seed(3)  # the probe gradient training_step drew
    (torch.tanh(x @ w) * frozen).backward(torch.randn(4, 8))
    expected = {tuple(t.shape): t.grad for t in (w, x)}
    for got in (first, second):
        assert len(got) == 2
        for g in got:
            assert torch.allclose(g, expected[tuple(g.shape)])


@pytest.mark.gpu
def test_graphed_step_timing_replays_consecutive_steps():
    """The timing graph holds GRAPH_STEPS calls of the step: the capture's 3 warm-up runs,
    then 3 warm-up and 20 timed replays, each GRAPH_STEPS calls."""
    import torch

    common = _bench("common")
    counter = torch.zeros((), device="cuda")
    timing = common.graphed_step_timing(lambda: counter.add_(1), torch.device("cuda"), reps=20)
    assert counter.item() == (3 + 3 + 20) * common.GRAPH_STEPS
    assert timing.median_ms > 0
