"""A model on the second GPU, called from a process whose current device is the first: every
kernel entry point makes its inputs' device current (Triton and the CuTe DSL launch on the
current device), so it computes what the same model computes on the first GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err, small_hybrid_config

from hybrid.model import HybridLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]


def _pair(dtype: torch.dtype) -> tuple[HybridLM, HybridLM]:
    """The same hybrid (MIMO Mamba-3, attention, MLP) on cuda:0 and on cuda:1, each copied
    from the host: a copy between the GPUs would enable peer access, and kernels launched on
    GPU 0 would then read GPU 1's tensors over NVLink and give the right numbers."""
    torch.manual_seed(0)
    on_host = HybridLM(small_hybrid_config(), dtype=dtype)
    return copy.deepcopy(on_host).to("cuda:0"), on_host.to("cuda:1")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_a_model_on_the_second_gpu_trains_like_one_on_the_first(dtype, tol):
    torch.cuda.set_device(0)
    first, second = _pair(dtype)
    tokens = torch.randint(0, 512, (4, 96))
    results = []
    for model in (first, second):
        device = next(model.parameters()).device
        logits = model(tokens.to(device))
        logits.float().logsumexp(-1).mean().backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results.append((logits.float().cpu(), grads.cpu()))
    assert torch.cuda.current_device() == 0
    assert rel_err(results[1][0], results[0][0]) <= tol
    assert rel_err(results[1][1], results[0][1]) <= tol


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_model_on_the_second_gpu_generates_what_one_on_the_first_does(cuda_graph):
    """Greedy fp32 generation, eager steps and a captured graph (its streams on cuda:1)."""
    torch.cuda.set_device(0)
    first, second = (model.eval() for model in _pair(torch.float32))
    prompt = torch.randint(0, 512, (4, 40))
    expected = first.generate(prompt.to("cuda:0"), 16, temperature=0, cuda_graph=cuda_graph)
    got = second.generate(prompt.to("cuda:1"), 16, temperature=0, cuda_graph=cuda_graph)
    assert torch.cuda.current_device() == 0
    assert torch.equal(got.cpu(), expected.cpu())
