"""Programmatic dependent launch on CUDA (marker `gpu`; skipped without a CUDA device): when
launches chain, and a hybrid's graphed decode with chained kernels against the same graph
unchained, bit for bit over many steps (a kernel reading before its predecessor finished
would show as a difference)."""

from __future__ import annotations

import pytest
import torch
from helpers import small_hybrid_config

import hybrid.kernels.dependent_launch as dl
from hybrid.kernels.mamba3_step_cute import cute_available
from hybrid.model import HybridLM

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def test_chains_inside_a_graph_capture_on_hopper_only(monkeypatch):
    assert dl.planned(CUDA).startswith("programmatic" if HOPPER else "none")
    row = torch.randn(4, device=CUDA)
    verdicts = {"eager": dl.chained(row, 1), "cpu": dl.chained(row.cpu(), 1)}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        verdicts["captured"] = dl.chained(row, 1)
        verdicts["two rows"] = dl.chained(row, 2)
        verdicts["three rows"] = dl.chained(row, 3)
        monkeypatch.setattr(dl, "ENABLED", False)
        verdicts["switched off"] = dl.chained(row, 1)
    assert verdicts == {"eager": False, "cpu": False, "captured": HOPPER, "two rows": HOPPER,
                        "three rows": False, "switched off": False}  # fmt: skip
    assert dl.planned(CUDA) == "none (HYBRID_PDL=0)"


STEPS = 24


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("backend", ["cute", "triton"])
def test_chained_graph_decodes_as_unchained(monkeypatch, backend, batch):
    """Norms, projections, Mamba-3 steps (MIMO R=2) and attention's append, split and combine
    kernels chained at batch 1 and 2: logits equal to the unchained graph's at every step."""
    if backend == "cute" and not cute_available():
        pytest.skip("nvidia-cutlass-dsl missing")
    torch.manual_seed(0)
    config = small_hybrid_config(decode_backend=backend)
    model = HybridLM(config, device=CUDA, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (batch, 40), device=CUDA)
    logits = {}
    for enabled in (False, True):
        monkeypatch.setattr(dl, "ENABLED", enabled)
        steps = []
        with torch.inference_mode():
            cache = model.allocate_cache(batch, 40 + STEPS)
            step = model.graphed_step(cache, batch)
            token = model(prompt, cache, last_only=True)[:, -1].argmax(-1)
            for _ in range(STEPS):
                steps.append(step(token).clone())
                token = steps[-1].argmax(-1)
        logits[enabled] = torch.stack(steps)
    assert torch.isfinite(logits[True]).all()
    assert torch.equal(logits[True], logits[False])
