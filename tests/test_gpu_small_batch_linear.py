"""The batch-1 projection kernel on CUDA (marker `gpu`; skipped without a CUDA device): which
calls it takes, its results against float64 with poisoned output buffers (plain, with
SwiGLU's gate product, with a block's norm and residual add, with the first block's norm of
rows gathered from the embedding), and a model's graphed decode
step with it against the same step on cuBLAS with the norms as kernels of their own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import poisoned, rel_err, small_hybrid_config

import hybrid.kernels.small_batch_linear as sbl
from hybrid.kernels.norms import rms_norm
from hybrid.model import HybridLM

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_takes_one_inference_row_inside_a_graph_capture_only():
    weight = torch.randn(64, 32, device=CUDA, dtype=torch.bfloat16)
    row = torch.randn(1, 32, device=CUDA, dtype=torch.bfloat16)
    assert not sbl.takes(row, weight)  # eager: cuBLAS's launch costs the host less
    verdicts = {}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        verdicts["row"] = sbl.takes(row, weight) and sbl.takes(row.unsqueeze(0), weight)
        rows = {n: torch.ones(n, 32, device=CUDA, dtype=row.dtype) for n in (2, 3)}
        verdicts["two rows"] = sbl.takes(rows[2], weight)
        verdicts["three rows"] = sbl.takes(rows[3], weight)
        big = torch.empty(sbl.TWO_ROW_BYTES // 1024 + 1, 1024, device=CUDA, dtype=row.dtype)
        wide = torch.ones(2, big.shape[1], device=CUDA, dtype=row.dtype)
        verdicts["two rows, large weight"] = sbl.takes(wide, big)
        verdicts["one row, large weight"] = sbl.takes(wide[:1], big)
        verdicts["dtypes differ"] = sbl.takes(row.float(), weight)
        verdicts["transposed weight"] = sbl.takes(row, weight.t().contiguous().t())
        verdicts["grad"] = sbl.takes(row.detach().requires_grad_(), weight)
        with torch.no_grad():
            verdicts["no grad"] = sbl.takes(row.detach().requires_grad_(), weight)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            verdicts["autocast"] = sbl.takes(row, weight)
    assert verdicts == {"row": True, "two rows": True, "three rows": False,
                        "two rows, large weight": False, "one row, large weight": True,
                        "dtypes differ": False,
                        "transposed weight": False, "grad": False, "no grad": True,
                        "autocast": False}  # fmt: skip


TOLERANCES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]  # rounding
SHAPES = [(37, 50), (2384, 512), (512, 1376), (8800, 2048), (50257, 512)]


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("form", ["plain", "gated", "normed", "normed x + δ", "normed gathered"])
@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_kernel_matches_float64(monkeypatch, dtype, tol, n, k, form, rows, early):
    """early: the weights loaded as a chained launch loads them, before the PDL wait (4-row
    tiles: the whole row up to 2,048 columns), here without the chaining itself."""
    monkeypatch.setattr(
        sbl, "_new_output", lambda shape, like: poisoned(shape, like.device, like.dtype)
    )
    if early:
        loads_early = sbl._loads_early
        monkeypatch.setattr(sbl, "_loads_early", lambda pdl, bn: loads_early(True, bn))
    weight = torch.randn(n, k, device=CUDA, dtype=dtype) / k**0.5
    x = torch.randn(rows, 1, 2 * k if form == "gated" else k, device=CUDA, dtype=dtype)
    expected = x.double()
    if form == "gated":  # silu(gate) ⊙ up, rounded to the dtype as the product kernel stores it
        gate, up = expected.chunk(2, dim=-1)
        expected = (F.silu(gate) * up).to(dtype).double()
    if form.startswith("normed"):  # RMSNorm(x + δ)·w, the sum rounded to the dtype
        delta = torch.randn_like(x) if form.endswith("δ") else None
        scale = 1 + torch.rand(k, device=CUDA, dtype=dtype)
        if form.endswith("gathered"):  # x: rows of an embedding table
            table = torch.randn(1000, k, device=CUDA, dtype=dtype)
            tokens = torch.randint(0, 1000, (rows, 1), device=CUDA)
            summed, out = sbl.embedding_normed_gemv(table, tokens, scale, 1e-5, weight)
            expected = table[tokens].double()
        else:
            summed, out = sbl.normed_gemv(x, delta, scale, 1e-5, weight)
        if delta is not None:
            expected = (expected + delta.double()).to(dtype)
        assert torch.equal(summed.double(), expected)
        expected = rms_norm(summed.double(), scale.double(), 1e-5)  # float64: PyTorch's path
    else:
        out = sbl.gemv(x, weight, gated=form == "gated")
    assert out.shape == (rows, 1, n)
    assert rel_err(out, F.linear(expected, weight.double())) < tol


def test_graphed_decode_step_matches_cublas(monkeypatch):
    torch.manual_seed(0)
    model = HybridLM(small_hybrid_config(), device=CUDA, dtype=torch.bfloat16).eval()
    prompt = torch.randint(0, 512, (1, 40), device=CUDA)
    calls, normed_calls, gathers = [], [], []
    gemv, normed_gemv, gathered = sbl.gemv, sbl.normed_gemv, sbl.embedding_normed_gemv
    monkeypatch.setattr(
        sbl, "gemv", lambda x, w, gated=False: calls.append(gated) or gemv(x, w, gated)
    )
    monkeypatch.setattr(
        sbl, "normed_gemv", lambda x, d, *a: normed_calls.append(d) or normed_gemv(x, d, *a)
    )
    monkeypatch.setattr(
        sbl, "embedding_normed_gemv", lambda t, tok, *a: gathers.append(tok) or gathered(t, tok, *a)
    )
    logits = {}
    for enabled in (False, True):
        monkeypatch.setattr(sbl, "ENABLED", enabled)
        with torch.inference_mode():
            cache = model.allocate_cache(1, 48)
            step = model.graphed_step(cache, 1)  # captured as `generate(cuda_graph=True)` does
            model(prompt, cache, last_only=True)
            logits[enabled] = step(prompt[:, -1]).float().clone()
    # captured once with the kernel: every block's norm with its layer's first projection and
    # the final norm with the head (the first block's gathering the embedding rows, the
    # others with a residual add), then the output projections of the 3 mixers and 3
    # SwiGLUs (those with their gate product)
    assert len(gathers) == 1 and len(normed_calls) == 3 + 3 - 1 + 1
    assert all(d is not None for d in normed_calls)
    assert len(calls) == 3 + 3 and sum(calls) == 3
    assert rel_err(logits[True], logits[False]) < 1e-2
