"""CUDA checks (marker `gpu`; skipped without a CUDA device): the chunked Mamba-3 path on the
GPU against the oracle, the FlashAttention backends against SDPA, and cached decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    decode_attention_reference,
    greedy_by_forwards,
    projection_slices,
    random_inputs,
    random_state,
    random_weights,
    rel_err,
    small_hybrid_config,
)

from hybrid.config import LayerSpec, ModelConfig
from hybrid.kernels.chunked import mamba3_chunked
from hybrid.kernels.mamba3_common import Mamba3Options
from hybrid.kernels.reference import mamba3_reference
from hybrid.layers import build
from hybrid.layers.attention import AttentionConfig, _import_fa2, _import_fa4, select_backend
from hybrid.model import HybridLM

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _to(obj, device):
    return type(obj)(*(None if t is None else t.to(device) for t in obj))


@pytest.mark.parametrize(("rank", "rotation"), [(1, "pairwise"), (4, "halves")])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_on_cuda_matches_reference(rank, rotation, dtype, tol):
    inputs = random_inputs(length=150, rank=rank, dtype=dtype)
    weights = random_weights(rank=rank, mimo=rank > 1, out_norm=True, dtype=dtype)
    state = random_state(rank=rank, dtype=dtype)
    options = Mamba3Options(rotation=rotation)
    expected, expected_state = mamba3_reference(inputs, weights, options, state)
    cuda_state = type(state)(*(t.to(CUDA) for t in state.tensors()))
    actual, actual_state = mamba3_chunked(
        _to(inputs, CUDA), _to(weights, CUDA), options, cuda_state, chunk_size=64
    )
    assert rel_err(actual.cpu(), expected) <= tol
    assert rel_err(actual_state.ssm.cpu(), expected_state.ssm) <= tol


def _flash_backend_or_skip() -> str:
    major = torch.cuda.get_device_capability()[0]
    if major in (9, 10) and _import_fa4() is not None:
        return "fa4"
    if major >= 8 and _import_fa2() is not None:
        return "fa2"
    pytest.skip("no flash-attn package for this GPU (install the `cuda` extra)")


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flash_attention_matches_sdpa(kv_heads):
    backend = _flash_backend_or_skip()
    assert select_backend("auto", CUDA, torch.bfloat16)[0] == backend
    torch.manual_seed(0)
    flash = build(
        LayerSpec("attention", AttentionConfig(n_heads=8, n_kv_heads=kv_heads, head_dim=128)), 1024
    )
    flash = flash.to(CUDA, torch.bfloat16)
    sdpa = build(
        LayerSpec(
            "attention",
            AttentionConfig(n_heads=8, n_kv_heads=kv_heads, head_dim=128, backend="sdpa"),
        ),
        1024,
    )
    sdpa = sdpa.to(CUDA, torch.bfloat16)
    sdpa.load_state_dict(flash.state_dict())
    x = torch.randn(2, 1000, 1024, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    out_flash = flash(x)
    out_sdpa = sdpa(x)
    assert rel_err(out_flash.float(), out_sdpa.float()) <= 1e-2
    probe = torch.randn_like(out_flash)
    (g_flash,) = torch.autograd.grad((out_flash * probe).sum(), flash.qkv.weight)
    (g_sdpa,) = torch.autograd.grad((out_sdpa * probe).sum(), sdpa.qkv.weight)
    assert rel_err(g_flash.float(), g_sdpa.float()) <= 2e-2


@pytest.mark.parametrize("rope", [True, False])
def test_prompt_append_matches_the_unfused_prefill_bit_for_bit(rope):
    """Attention's prefill into a KV cache without autograd (one kernel: RoPE, k and v into
    the cache, the positions set) against the same prefills under autograd (RoPE kernels and
    copies): outputs, cache and positions bit for bit, from an empty and a filled cache."""
    torch.manual_seed(0)
    config = AttentionConfig(n_heads=8, n_kv_heads=2, head_dim=64, rope=rope)
    layer = build(LayerSpec("attention", config), 512).to(CUDA, torch.bfloat16)
    prompts = [torch.randn(3, n, 512, device=CUDA, dtype=torch.bfloat16) for n in (40, 9)]
    results = {}
    for fused in (True, False):
        cache = layer.allocate_cache(3, 64, device=CUDA, dtype=torch.bfloat16)
        with torch.set_grad_enabled(not fused):
            outs = [layer(x, cache).detach() for x in prompts]
        results[fused] = (*outs, cache.k, cache.v, cache.seqlens, torch.tensor(cache.length))
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False], strict=True))
    assert results[True][-1] == 49 and (results[True][-2] == 49).all()


def test_nope_attention_with_an_odd_head_dim_caches_every_value_on_cuda():
    """NoPE allows an odd head dim (25 here), which the one-kernel appends refuse: on CUDA
    the layer's prefill into a cache and its decode steps match the CPU's, cache included."""
    torch.manual_seed(0)
    config = AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=25, rope=False)
    layer = build(LayerSpec("attention", config), 100)
    x = torch.randn(2, 24, 100)
    results = {}
    for device in ("cpu", "cuda"):
        on_device = copy.deepcopy(layer).to(device)
        cache = on_device.allocate_cache(2, 32, device=device, dtype=torch.float32)
        with torch.no_grad():
            outs = [on_device(x[:, :20].to(device), cache)]
            outs += [on_device(x[:, t : t + 1].to(device), cache) for t in range(20, 24)]
        results[device] = [torch.cat(outs, 1).cpu(), cache.k.cpu(), cache.v.cpu()]
    for mine, ref in zip(results["cuda"], results["cpu"], strict=True):
        assert torch.isfinite(mine).all() and rel_err(mine, ref) <= 1e-5


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_hybrid_decode_on_cuda_matches_forward(dtype, tol):
    torch.manual_seed(0)
    config = ModelConfig.from_pattern(
        "M-M-*-M-",
        d_model=256,
        vocab_size=512,
        mamba3={"d_state": 64, "headdim": 64, "mimo_rank": 2, "pregate_norm": True},
        attention={"n_heads": 4, "n_kv_heads": 2},
    )
    model = HybridLM(config, device=CUDA, dtype=dtype).eval()
    tokens = torch.randint(0, 512, (4, 100), device=CUDA)
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model.prefill(tokens[:, :70])
        steps = [logits] + [model.step(tokens[:, t], cache)[:, None] for t in range(70, 100)]
    assert rel_err(torch.cat(steps, dim=1).float(), full.float()) <= tol


def test_cuda_graph_of_a_hybrid_step_replays_the_eager_step():
    import copy

    from hybrid.search.latency import capture_cuda_graph

    torch.manual_seed(0)
    config = small_hybrid_config()
    model = HybridLM(config, device=CUDA, dtype=torch.float32).eval()
    with torch.inference_mode():
        _, cache = model.prefill(torch.randint(0, 512, (4, 300), device=CUDA), max_seqlen=301)
        token = torch.randint(0, 512, (4,), device=CUDA)
        out = {}

        def step():
            cache.rewind(300)
            out["logits"] = model.step(token, cache)

        replay = capture_cuda_graph(step)
        cache.rewind(300)
        before = copy.deepcopy(cache)
        replay()
        expected = model.step(token, before)
        assert rel_err(out["logits"], expected) <= 1e-5
        assert rel_err(cache.layers[0].ssm, before.layers[0].ssm) <= 1e-5


def test_decode_latency_is_repeatable_in_process():
    from hybrid.search.latency import LatencyRequest, measure

    config = ModelConfig.from_pattern(
        "M-M-M-*-" * 2,
        d_model=512,
        mamba3={"d_state": 64},
        attention={"n_heads": 8, "n_kv_heads": 2},
    )
    a, b = (measure(config, LatencyRequest("decode", 8, 2048), CUDA) for _ in range(2))
    assert a.graphed and a.device == torch.cuda.get_device_name()
    assert abs(a.median_ms - b.median_ms) / a.median_ms <= 0.05, (a, b)
    prefill = measure(config, LatencyRequest("prefill", 8, 512), CUDA)
    assert prefill.graphed and prefill.median_ms > 0 and prefill.peak_memory_bytes > 0


@pytest.mark.parametrize(
    ("rank", "rotation", "norm"),
    [(1, "pairwise", False), (2, "pairwise", True), (4, "halves", True)],
)
@pytest.mark.parametrize(("headdim", "d_state"), [(32, 128), (64, 128), (64, 64)])
def test_triton_decode_kernel_on_cuda_matches_the_oracle(rank, rotation, norm, headdim, d_state):
    from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3State
    from hybrid.kernels.mamba3_step_triton import mamba3_step_triton
    from hybrid.kernels.reference import mamba3_reference_step

    shape = {"heads": 8, "headdim": headdim, "d_state": d_state, "rank": rank}
    angles = d_state // 4
    inputs = random_inputs(batch=16, length=1, groups=1, angles=angles, dtype=torch.float32,
                           **shape)  # fmt: skip
    # column slices of one buffer, as the layer passes them (read through their row strides)
    slices = projection_slices(Mamba3Inputs(*(t.to(CUDA) for t in inputs)))[0]
    token = Mamba3Inputs(*(t[:, 0] for t in slices))
    weights = _to(random_weights(mimo=rank > 1, out_norm=norm, dtype=torch.float32, **shape), CUDA)
    state = random_state(batch=16, angles=angles, dtype=torch.float32, **shape)
    state = Mamba3State(*(t.to(CUDA) for t in state.tensors()))
    options = Mamba3Options(rotation=rotation)
    expected, expected_state = mamba3_reference_step(token, weights, options, state)
    mine = Mamba3State(*(t.clone() for t in state.tensors()))
    guard = torch.full((1 << 20,), float("nan"), device=CUDA)  # allocated after: OOB canary
    out = mamba3_step_triton(token, weights, options, mine)
    assert rel_err(out, expected) <= 1e-5 and rel_err(mine.ssm, expected_state.ssm) <= 1e-5
    assert torch.isnan(guard).all()
    bf16 = Mamba3Inputs(*(t.to(torch.bfloat16) for t in token))
    half_state = Mamba3State(*(t.clone() for t in state.tensors()))
    out16 = mamba3_step_triton(bf16, weights, options, half_state)
    ref16, _ = mamba3_reference_step(
        Mamba3Inputs(*(t.float() for t in bf16)), weights, options, state
    )
    assert rel_err(out16.float(), ref16) <= 1e-2


def _generation_model(pattern, dtype):
    torch.manual_seed(0)
    return HybridLM(small_hybrid_config(pattern), device=CUDA, dtype=dtype).eval()


@pytest.mark.parametrize("pattern", ["M-*-M-*-", "*-*-"])
def test_cuda_graph_generate_equals_greedy_through_forwards_fp32(pattern):
    """One captured step replayed at 24 positions: in fp32 the tokens are exactly the greedy
    argmax of full forwards (logit errors ~1e-6 against gaps between random logits)."""
    model = _generation_model(pattern, torch.float32)
    prompt = torch.randint(0, 512, (4, 50), device=CUDA)
    graphed = model.generate(prompt, 24, temperature=0, cuda_graph=True)
    assert torch.equal(graphed, model.generate(prompt, 24, temperature=0))
    assert torch.equal(graphed, greedy_by_forwards(model, prompt, 24))


def test_cuda_graph_generate_in_bf16_is_greedy_within_bf16_error():
    """bf16 (FA4 decode where available): graph replays pick what eager steps pick, and every
    chosen token is within 3e-2 · max|logit| of the teacher-forced forward's best, the bound
    `test_hybrid_decode_on_cuda_matches_forward` puts on bf16 decode against forward logits."""
    model = _generation_model("M-*-M-*-", torch.bfloat16)
    prompt = torch.randint(0, 512, (8, 50), device=CUDA)
    graphed = model.generate(prompt, 32, temperature=0, cuda_graph=True)
    eager = model.generate(prompt, 32, temperature=0)
    assert (graphed == eager).float().mean() >= 0.9
    with torch.no_grad():
        logits = model(graphed[:, :-1])[:, 49:].float()
    chosen = logits.gather(-1, graphed[:, 50:, None]).squeeze(-1)
    assert (logits.amax(-1) - chosen <= 3e-2 * logits.abs().amax()).all()


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(16, 4, 128), (16, 16, 64)])
def test_fa4_decode_matches_sdpa_decode_at_ragged_lengths(heads, kv_heads, head_dim):
    from hybrid.cache import KVCache
    from hybrid.layers.attention import _import_fa4_decode, fa4_decode, sdpa_decode

    backend, why = select_backend("auto", CUDA, torch.bfloat16)
    if backend != "fa4" or _import_fa4_decode() is None:
        pytest.skip(f"no flash-attn-4 decode: prefill backend {backend} ({why})")
    torch.manual_seed(0)
    cache = KVCache.empty(8, kv_heads, 1100, head_dim, device=CUDA, dtype=torch.bfloat16)
    cache.k.normal_(), cache.v.normal_()
    lengths = [1, 17, 128, 129, 500, 1000, 1099, 1100]
    cache.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
    q = torch.randn(8, 1, heads, head_dim, device=CUDA, dtype=torch.bfloat16)
    assert rel_err(fa4_decode(q, cache).float(), sdpa_decode(q, cache).float()) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "head_dim", "splits", "capacity"),
    [(1, 8, 2, 64, None, 4100), (1, 16, 4, 128, 7, 4100), (8, 16, 4, 128, None, 4100),
     (8, 12, 12, 64, 1, 4100), (3, 6, 2, 32, 3, 4100), (1, 8, 2, 64, None, 32778)],
)  # fmt: skip
def test_split_kv_decode_matches_attention_at_ragged_lengths(
    batch, heads, kv_heads, head_dim, splits, capacity, dtype
):
    """The split-KV kernel against float64 softmax attention over each sequence's filled
    positions (those past it hold NaN: never read), split counts as the device picks them
    (None: 64+ at batch 1; 128, capped, at 32,778, the last 25 past the capacity) and
    forced. fp32 to 1e-5; bf16 to 1e-2 (p rounded to bf16 before its product with v, as
    every flash kernel does)."""
    from hybrid.kernels.attention_decode import split_kv_decode

    torch.manual_seed(0)
    lengths = torch.randint(1, capacity + 1, (batch,))
    lengths[0] = capacity
    k, v = (torch.randn(batch, kv_heads, capacity, head_dim, device=CUDA) for _ in range(2))
    q = torch.randn(batch, 1, heads, head_dim, device=CUDA)
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype)
    seqlens = lengths.to(CUDA, torch.int32)
    expected = decode_attention_reference(q, k, v, seqlens)
    for b, length in enumerate(lengths.tolist()):
        k[b, :, length:], v[b, :, length:] = float("nan"), float("nan")
    out = split_kv_decode(q, k, v, seqlens, splits)
    assert rel_err(out.double(), expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_graphed_attention_step_is_valid_at_every_position():
    """A graph of the auto-backend step captured once, replayed at 6 positions, against eager
    SDPA steps of the same weights."""
    from hybrid.graphs import capture_cuda_graph

    def layer(backend):
        torch.manual_seed(0)
        config = AttentionConfig(n_heads=16, n_kv_heads=4, head_dim=128, backend=backend)
        return build(LayerSpec("attention", config), 1024).to(CUDA, torch.bfloat16)

    auto, sdpa = layer("auto"), layer("sdpa")
    x = torch.randn(4, 300, 1024, device=CUDA, dtype=torch.bfloat16)
    with torch.inference_mode():
        graphed = auto.allocate_cache(4, 320, device=CUDA, dtype=torch.bfloat16)
        eager = sdpa.allocate_cache(4, 320, device=CUDA, dtype=torch.bfloat16)
        auto(x, graphed), sdpa(x, eager)
        token, out = torch.zeros(4, 1024, device=CUDA, dtype=torch.bfloat16), {}

        def step():
            out["y"] = auto.step(token, graphed)

        replay = capture_cuda_graph(step, warmup=1)
        graphed.rewind(300)
        for _ in range(6):
            token.copy_(torch.randn_like(token))
            replay()
            graphed.advance(1)
            assert rel_err(out["y"].float(), sdpa.step(token, eager).float()) <= 1e-2
        assert graphed.seqlens.tolist() == eager.seqlens.tolist() == [306] * 4


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37, 4096])
def test_fused_residual_add_and_norm_on_cuda(rows, out_dtype):
    """A bf16 block output added into a float32 residual stream and normalised, as a training
    step under autocast runs it (the norm in bf16, as the next projection takes it), against
    `x + δ` and the PyTorch RMSNorm; gradients too."""
    from hybrid.kernels.fused_norms import fused_add_rms_norm

    dim = 384
    x = torch.randn(rows, dim, device=CUDA, requires_grad=True)
    delta = torch.randn(rows, dim, device=CUDA).bfloat16().requires_grad_()
    weight = (1 + 0.2 * torch.randn(dim, device=CUDA)).requires_grad_()
    probes = torch.randn(rows, dim, device=CUDA), torch.randn(rows, dim, device=CUDA)
    summed, normed = fused_add_rms_norm(x, delta, weight, 1e-5, out_dtype)
    ((summed * probes[0]).sum() + (normed * probes[1]).sum()).backward()
    mine = [t.grad for t in (x, delta, weight)]
    for t in (x, delta, weight):
        t.grad = None
    ref_sum = x + delta
    ref_norm = ref_sum * torch.rsqrt(ref_sum.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    ref_norm = ref_norm.to(out_dtype or torch.float32)
    ((ref_sum * probes[0]).sum() + (ref_norm * probes[1]).sum()).backward()
    assert summed.dtype == torch.float32 and mine[1].dtype == torch.bfloat16
    assert normed.dtype == (out_dtype or torch.float32)
    norm_tol = 4e-3 if out_dtype else 1e-5  # bf16's rounding step is 2^-8
    assert rel_err(summed, ref_sum) <= 1e-6 and rel_err(normed, ref_norm) <= norm_tol
    for got, ref, tol in zip(mine, (x.grad, delta.grad, weight.grad), (1e-5, 4e-3, 1e-5),
                             strict=True):  # fmt: skip
        assert rel_err(got.float(), ref.float()) <= tol


@pytest.mark.parametrize("rank", [1, 2])
def test_glue_moved_into_kernels_changes_no_bit_of_a_training_step(monkeypatch, rank):
    """Under autocast the pre-norms write bf16 (what each layer's first projection takes),
    Mamba-3's padded in_proj weight is cast as it is padded, and the scan's backward kernels
    write in_proj's input gradient into one buffer (no `cat`): logits and every gradient
    equal, bit for bit, those of float32 norms, a float32 padded weight that autocast casts
    and a plain split, since the roundings are the same ones, merely moved into other
    kernels."""
    from hybrid import model as model_module
    from hybrid.kernels.projection_grads import plain_split
    from hybrid.layers import mamba3 as mamba3_module
    from hybrid.train_step import deterministic_algorithms

    config = ModelConfig.from_pattern(
        "M-*-M-", d_model=128, mamba3={"d_state": 32, "headdim": 32, "mimo_rank": rank},
        attention={"n_heads": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridLM(config, device=CUDA)
    tokens = torch.randint(0, config.vocab_size, (4, 96), device=CUDA)

    def run() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with deterministic_algorithms(True):  # the embedding's backward adds atomically else
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens)
            logits.float().square().mean().backward()
        return [logits.detach(), *(p.grad for p in model.parameters())]

    fused = run()
    for module in (model_module, mamba3_module):
        monkeypatch.setattr(module, "autocast_dtype", lambda t: None)
    monkeypatch.setattr(mamba3_module, "split_projection", plain_split)
    cast = run()
    assert fused[0].dtype == cast[0].dtype == torch.bfloat16
    for a, b in zip(fused, cast, strict=True):
        assert torch.equal(a, b)
