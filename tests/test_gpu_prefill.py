"""The Triton prefill on CUDA (marker `gpu`) against the float64 chunked path (itself equal
to the oracle to ~1e-15): output, final state and every gradient, in float32 and bf16, with
kernel outputs poisoned with NaN so an element a kernel forgot to write cannot pass. The
scan runs on column slices of one tensor, as the layer's in_proj output, with the inputs'
gradients written into the split's (poisoned) buffer.

Bounds: float32 runs full-precision products ("ieee"), so 1e-4 leaves two orders for the
chunked sums. bf16 rounds q, k, v, dy and the chunk states (unit roundoff 2^-9 ≈ 2e-3)
before every tensor-core product; sums stay in float32, so relative L2 errors are a few
roundoffs: 2e-2 for outputs and states, 5e-2 for gradients. The log-decay gradients (of
`a`, the A pre-activation) and the angle gradients are reverse sums over the later tokens of
differences of bf16-rounded products that cancel, by an amount that varies from draw to draw
(twice the bound for `a` and the initial angle failed about one draw in 25: `a` reached 0.22
against 0.1). So in bf16 each gradient may also be off by SENSITIVITY times what the float64
reference itself moves when every input is perturbed by 2^-8 relative noise, the size of the
rounding the kernels do: over 25 draws of each case the kernels' error reached 5.0 times
that (`a`, R=2), 4.0 (`a`, R=4) and 3.4 (the initial angle, R=8). dt_bias's gradient is
exactly the sum over tokens of dt's, which cancel heavily (e.g. 489 against terms of ±4000):
its error is bounded by the same 5e-2 relative to Σ_t |d dt_t| per head, the most a sum of
per-token errors of that size can reach.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    from_leaves,
    named_leaves,
    poisoned,
    projection_slices,
    random_inputs,
    random_state,
    random_weights,
    rel_err,
)
from triton.runtime.errors import OutOfResources

from hybrid.kernels import mamba3_prefill_core, projection_grads
from hybrid.kernels.chunked import mamba3_chunked
from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options, Mamba3State
from hybrid.kernels.mamba3_prefill import mamba3_prefill

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BOUNDS = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 5e-2)}
SENSITIVITY = 8.0


def _perturbed(leaves: dict, scale: float = 2.0**-8) -> dict:
    """Float64 copies of the leaves times (1 + u), u uniform in ±scale."""
    out = {}
    for name, leaf in leaves.items():
        noise = 2 * torch.rand_like(leaf, dtype=torch.float64) - 1
        out[name] = (leaf.detach().double() * (1 + scale * noise)).requires_grad_()
    return out


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs and the split projection's gradient buffer: NaN until written."""
    monkeypatch.setattr(
        mamba3_prefill_core,
        "_new_output",
        lambda shape, like, dtype=None: poisoned(shape, like.device, dtype or like.dtype),
    )
    monkeypatch.setattr(projection_grads, "_allocate", poisoned)


def _leaves(inputs, weights, state, dtype):
    return {
        k: v.detach().to(CUDA, dtype if k.startswith("in.") else torch.float32).requires_grad_()
        for k, v in named_leaves(inputs, weights, state).items()
    }


def _run(fn, named, probe_out, probe_ssm):
    out, final = fn(*from_leaves(named))
    loss = (out.double() * probe_out).sum() + (final.ssm.double() * probe_ssm).sum()
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return out, final, dict(zip(named, grads, strict=True))


@pytest.mark.parametrize(
    ("rank", "headdim", "d_state", "chunk", "length"),
    [(1, 64, 128, 64, 300), (1, 32, 64, 32, 129), (2, 64, 64, 32, 200), (4, 64, 128, 16, 257),
     (8, 32, 32, 8, 100), (1, 128, 256, 64, 200)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prefill_matches_the_chunked_path(rank, headdim, d_state, chunk, length, dtype):
    _check_against_chunked(rank, headdim, d_state, chunk, length, dtype)


@pytest.mark.parametrize(
    ("rank", "chunk", "dtype"), [(1, 64, torch.bfloat16), (4, 16, torch.float32)]
)
def test_state_pass_carrying_whole_rows_matches_the_chunked_path(rank, chunk, dtype, monkeypatch):
    """Large batches carry whole state rows in one state-pass program (`state_pass_columns`);
    these shapes have too few (sequence, head) pairs to choose that, so it is forced."""
    monkeypatch.setattr(mamba3_prefill_core, "state_pass_columns", lambda pairs: 128)
    _check_against_chunked(rank, 64, 128, chunk, 300, dtype)


@pytest.mark.parametrize(
    ("rank", "chunk", "dtype"), [(1, 16, torch.bfloat16), (4, 4, torch.float32)]
)
def test_segmented_state_pass_matches_the_chunked_path(rank, chunk, dtype, monkeypatch):
    """Few (sequence, head) pairs cut each state pass into segments joined by a fix-up pass
    (`state_pass_segments`); forced here to 4 (19 or 75 chunks a sequence: the last segment
    shorter), with an initial state entering the first."""
    monkeypatch.setattr(mamba3_prefill_core, "state_pass_segments", lambda *_: 4)
    _check_against_chunked(rank, 64, 128, chunk, 300, dtype)


SCAN_KERNELS = ("_state_pass_kernel", "_chunk_output_kernel", "_chunk_grad_kernel")


@pytest.mark.parametrize(
    "config", mamba3_prefill_core.CANDIDATE_CONFIGS, ids=lambda c: f"w{c.num_warps}s{c.num_stages}"
)
@pytest.mark.parametrize(("rank", "chunk"), [(1, 64), (4, 16)])
def test_every_autotune_candidate_computes_the_same_scan(config, rank, chunk, monkeypatch):
    """The suite compiles one config per kernel (HYBRID_TRITON_AUTOTUNE=0) and training picks
    the fastest candidate, so each candidate runs here too, in bf16 at the paper's head shape:
    a compiler bug may hit one layout only (fla #640: Triton 3.4–3.7.0 on Hopper corrupts a
    transposed MMA result fed to another MMA, the pattern of our dq/dk products, at one tile
    size)."""
    for name in SCAN_KERNELS:
        monkeypatch.setattr(getattr(mamba3_prefill_core, name), "configs", [config])
    try:
        _check_against_chunked(rank, 64, 128, chunk, 200, torch.bfloat16)
    except OutOfResources as error:  # the autotuner drops such a candidate too
        pytest.skip(f"{config} does not fit this GPU: {error}")


def _check_against_chunked(rank, headdim, d_state, chunk, length, dtype):
    heads, batch = 4, 2
    inputs = random_inputs(batch=batch, length=length, heads=heads, headdim=headdim,
                           d_state=d_state, rank=rank, groups=2, angles=d_state // 4)  # fmt: skip
    weights = random_weights(heads=heads, headdim=headdim, d_state=d_state, rank=rank,
                             mimo=rank > 1, out_norm=rank in (2, 8))  # fmt: skip
    state = random_state(batch=batch, heads=heads, headdim=headdim, d_state=d_state, rank=rank,
                         angles=d_state // 4)  # fmt: skip
    options = Mamba3Options(rotation="pairwise" if rank == 1 else "halves")
    mine_leaves = _leaves(inputs, weights, state, dtype)
    # the reference sees the same (rounded) inputs: the bound is the kernels' error alone
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in mine_leaves.items()}
    probe_out = torch.randn(batch, length, heads, headdim, device=CUDA, dtype=torch.float64)
    probe_ssm = torch.randn(batch, heads, headdim, d_state, device=CUDA, dtype=torch.float64)

    def chunked(i, w, s):
        return mamba3_chunked(i, w, options, s, chunk_size=chunk)

    expected = _run(chunked, ref_leaves, probe_out, probe_ssm)
    moved = (
        _run(chunked, _perturbed(mine_leaves), probe_out, probe_ssm)[2]
        if dtype != torch.float32
        else {}
    )

    def triton(i, w, s):  # on in_proj-like slices, as the layer calls it
        sliced, grads = projection_slices(i)
        return mamba3_prefill(sliced, w, options, s, chunk_size=chunk, grads=grads)

    actual = _run(triton, mine_leaves, probe_out, probe_ssm)
    out_bound, grad_bound = BOUNDS[dtype]
    assert rel_err(actual[0], expected[0]) <= out_bound
    assert rel_err(actual[1].ssm, expected[1].ssm) <= out_bound
    for name, grad in expected[2].items():
        if name == "w.dt_bias":
            scale = expected[2]["in.dt"].abs().sum(dim=(0, 1))
            assert ((actual[2][name] - grad).abs() <= grad_bound * scale).all(), name
        elif grad is not None:
            bound = 2 * grad_bound if name in ("state.angle", "in.a") else grad_bound
            if name in moved:  # bf16: what rounding-sized input noise moves the reference by
                bound = max(bound, SENSITIVITY * rel_err(moved[name], grad))
            error = rel_err(actual[2][name], grad)
            assert error <= bound, f"{name}: {error:.3g} > {bound:.3g}"


def test_varlen_equals_separate_sequences_on_cuda():
    lengths, heads, headdim, d_state = [700, 64, 1, 300], 4, 64, 128
    inputs = random_inputs(batch=1, length=sum(lengths), heads=heads, headdim=headdim,
                           d_state=d_state, groups=1, angles=32, dtype=torch.float32)  # fmt: skip
    weights = random_weights(heads=heads, headdim=headdim, d_state=d_state, dtype=torch.float32)
    state = random_state(batch=len(lengths), heads=heads, headdim=headdim, d_state=d_state,
                         angles=32, dtype=torch.float32)  # fmt: skip
    inputs, weights = (type(t)(*(None if v is None else v.to(CUDA) for v in t)) for t in
                       (inputs, weights))  # fmt: skip
    state = Mamba3State(*(t.to(CUDA) for t in state.tensors()))
    options = Mamba3Options()
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    out, final = mamba3_prefill(inputs, weights, options, state, cu_seqlens=bounds)
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        piece = Mamba3Inputs(*(t[:, start:end] for t in inputs))
        row = Mamba3State(*(t[i : i + 1] for t in state.tensors()))
        expected, expected_final = mamba3_prefill(piece, weights, options, row)
        assert rel_err(out[:, start:end], expected) <= 1e-5
        assert rel_err(final.ssm[i : i + 1], expected_final.ssm) <= 1e-5


@pytest.mark.parametrize(("rank", "state_dtype"), [(1, torch.float32), (2, torch.bfloat16),
                                                   (4, torch.float32)])  # fmt: skip
def test_prefill_into_a_cache_in_place_matches_the_autograd_form(rank, state_dtype):
    """A bf16 varlen prefill into a decode cache without autograd (the cache in and out by
    the handoff kernels, updated in place) against the same call under autograd (PyTorch's
    handoff): the output and every cache tensor, a bf16 or float32 SSM state."""
    lengths, heads, headdim, d_state, angles = [300, 1, 77], 4, 64, 128, 32
    inputs = random_inputs(batch=1, length=sum(lengths), heads=heads, headdim=headdim,
                           d_state=d_state, rank=rank, groups=2, angles=angles)  # fmt: skip
    weights = random_weights(heads=heads, headdim=headdim, d_state=d_state, rank=rank,
                             mimo=rank > 1, out_norm=rank == 2)  # fmt: skip
    state = random_state(batch=len(lengths), heads=heads, headdim=headdim, d_state=d_state,
                         rank=rank, angles=angles)  # fmt: skip
    inputs = Mamba3Inputs(*(t.to(CUDA, torch.bfloat16) for t in inputs))
    weights = type(weights)(*(None if w is None else w.to(CUDA, torch.float32) for w in weights))
    dtypes = (torch.float32, state_dtype, torch.bfloat16, torch.bfloat16, torch.float32)
    state = Mamba3State(*(t.to(CUDA, d) for t, d in zip(state.tensors(), dtypes, strict=True)))
    cache = Mamba3State(*(t.clone() for t in state.tensors()))
    options = Mamba3Options(rotation="pairwise" if rank == 1 else "halves")
    bounds = [0, *itertools.accumulate(lengths)]
    with torch.no_grad():
        out, updated = mamba3_prefill(inputs, weights, options, cache, cu_seqlens=bounds,
                                      update_state=True)  # fmt: skip
    expected, final = mamba3_prefill(inputs, weights, options, state, cu_seqlens=bounds)
    assert updated is cache
    # the two initial states agree to float32 roundoff, which can flip a bf16 output or
    # state element by one rounding (2^-8) here and there
    assert rel_err(out, expected) <= 1e-3
    ssm_bound = 2e-3 if state_dtype == torch.bfloat16 else 1e-5
    for name, mine, ref in zip(("angle", "ssm", "k", "x", "gamma"), cache.tensors(),
                               final.tensors(), strict=True):  # fmt: skip
        assert mine.dtype == ref.dtype, name
        assert rel_err(mine, ref) <= (ssm_bound if name == "ssm" else 1e-6), name


def inference_kernels(layer: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The kernels one inference forward of `layer` launches."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        layer(x)  # compiled and autotuned before the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            layer(x)
            torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


@pytest.mark.parametrize(("rank", "norm"), [(1, False), (4, True)])
def test_a_prefill_runs_the_output_gate_inside_the_core(rank, norm):
    """Without autograd the output stage (pre-gate norm, silu gate, MIMO sum) runs in the
    core's output kernel: no gate kernel, and the layer's output is the autograd form's
    (separate gate kernel) to bf16 rounding."""
    from hybrid.config import LayerSpec
    from hybrid.layers import build
    from hybrid.layers.mamba3 import Mamba3Config

    config = Mamba3Config(mimo_rank=rank, pregate_norm=norm)
    layer = build(LayerSpec("mamba3", config), 512).to(CUDA, torch.bfloat16)
    x = torch.randn(2, 300, 512, device=CUDA, dtype=torch.bfloat16)
    names = inference_kernels(layer, x)
    assert not any("_gate_fwd_kernel" in n for n in names)
    assert any("_chunk_output_kernel" in n for n in names)
    with torch.inference_mode():
        fused = layer(x)
    with torch.enable_grad():
        separate = layer(x.requires_grad_())
    assert rel_err(fused, separate.detach()) <= 1e-2


def test_bf16_layer_reads_its_parameters_as_stored():
    """A bf16 Mamba-3 layer's Triton forward (MIMO R=4, pre-gate norm, d_model 512) launches
    no conversion kernel: dt_bias, the B/C biases, D and the MIMO and norm weights are read as
    stored and widened in the kernels. Each `.float()` had been a launch of its own (~2.4 µs
    on an H100; 7-8 a layer, 12-20% of a 31M model's batch-1 prefill)."""
    from hybrid.config import LayerSpec
    from hybrid.layers import build
    from hybrid.layers.mamba3 import Mamba3Config

    config = Mamba3Config(mimo_rank=4, pregate_norm=True)
    layer = build(LayerSpec("mamba3", config), 512).to(CUDA, torch.bfloat16)
    x = torch.randn(1, 512, 512, device=CUDA, dtype=torch.bfloat16)
    assert [n for n in inference_kernels(layer, x) if "copy" in n] == []
