"""Every registered layer: builds, runs forward and backward, decodes step by step exactly
as its forward computes, and reports parameters and state bytes that match reality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from hybrid.config import LayerSpec, layer_config
from hybrid.layers import available, build, entry
from hybrid.layers.attention import AttentionConfig, rope_rotate
from hybrid.layers.mamba3 import PROJECTION_ALIGNMENT, Mamba3Config
from hybrid.layers.norms import GroupedGatedRMSNorm
from hybrid.layers.swiglu import SwiGLUConfig

D_MODEL = 32
SMALL = {
    "mamba3": [
        Mamba3Config(d_state=16, headdim=8, chunk_size=4),
        Mamba3Config(
            d_state=16, headdim=8, chunk_size=4, mimo_rank=2, ngroups=2, pregate_norm=True
        ),
        Mamba3Config(
            d_state=8,
            headdim=16,
            chunk_size=8,
            mimo_rank=4,
            rope_fraction=1.0,
            a_activation="softplus",
        ),
    ],
    "attention": [
        AttentionConfig(n_heads=4, n_kv_heads=2),
        AttentionConfig(n_heads=4, rope=False),
    ],
    "swiglu": [SwiGLUConfig(hidden=48), SwiGLUConfig()],
}


def _perturbed(layer):
    """Move parameters off their (often all-ones) init so every term is exercised."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def test_registry_lists_the_three_layers():
    assert available() == ["attention", "mamba3", "swiglu"]
    assert {entry(n).symbol for n in available()} == {"*", "M", "-"}
    assert entry("mamba3").is_mixer and entry("attention").is_mixer
    assert not entry("swiglu").is_mixer


def test_every_registered_layer_has_test_configs():
    assert set(SMALL) == set(available())


@pytest.mark.parametrize(
    ("kind", "config"), [(k, c) for k, configs in SMALL.items() for c in configs]
)
def test_forward_backward_and_step_decode(kind, config):
    torch.manual_seed(1)
    layer = _perturbed(build(LayerSpec(kind, config), D_MODEL)).to(torch.float32)
    x = torch.randn(2, 11, D_MODEL, requires_grad=True)
    full = layer(x)
    assert full.shape == x.shape and torch.isfinite(full).all()
    full.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert x.grad.abs().sum() > 0

    # what the model folds its norm into: a bias-free projection of the layer's input
    projection = layer.step_projection()
    assert projection is None or (projection.bias is None and projection.in_features == D_MODEL)
    with torch.no_grad():
        prefix = 4
        cache = layer.allocate_cache(2, 16, device=x.device, dtype=x.dtype)
        outs = [layer(x[:, :prefix], cache)]
        outs += [layer.step(x[:, t], cache)[:, None] for t in range(prefix, x.shape[1])]
        assert rel_err(torch.cat(outs, dim=1), full) <= 1e-4


@pytest.mark.parametrize("config", SMALL["mamba3"])
def test_mamba3_param_count_and_state_bytes(config):
    layer = build(LayerSpec("mamba3", config), D_MODEL)
    d_inner = config.expand * D_MODEL
    h, r, n, p = d_inner // config.headdim, config.mimo_rank, config.d_state, config.headdim
    s = int(n * config.rope_fraction) // 2
    in_proj = D_MODEL * (2 * d_inner + 2 * r * config.ngroups * n + 3 * h + s)
    expected = in_proj + d_inner * D_MODEL + h + 2 * n + 2 * h * r * n + h
    expected += 3 * h * r * p if r > 1 else 0
    expected += d_inner if config.pregate_norm else 0
    assert layer.num_params() == expected
    cache = layer.allocate_cache(3, 1, device="cpu", dtype=torch.bfloat16)
    assert layer.state_bytes(4096, torch.bfloat16) * 3 == cache.nbytes


@pytest.mark.parametrize("config", SMALL["attention"])
def test_attention_param_count_and_state_bytes(config):
    layer = build(LayerSpec("attention", config), D_MODEL)
    hd = D_MODEL // config.n_heads
    expected = D_MODEL * (config.n_heads + 2 * config.kv_heads) * hd + config.n_heads * hd * D_MODEL
    assert layer.num_params() == expected
    cache = layer.allocate_cache(2, 100, device="cpu", dtype=torch.bfloat16)
    assert layer.state_bytes(100, torch.bfloat16) * 2 == cache.nbytes


def test_swiglu_param_count_and_default_width():
    assert build(LayerSpec("swiglu", SwiGLUConfig(hidden=48)), D_MODEL).num_params() == (
        3 * 48 * D_MODEL
    )
    assert SwiGLUConfig().hidden_size(512) == 1408  # 8/3·512 = 1365.3 -> 1408
    assert build(LayerSpec("swiglu", SwiGLUConfig()), D_MODEL).state_bytes(10**6) == 0


def test_mamba3_initialisation():
    config = Mamba3Config(d_state=16, headdim=8, mimo_rank=4, pregate_norm=True)
    layer = build(LayerSpec("mamba3", config), 64)
    dt = F.softplus(layer.dt_bias)
    assert (dt >= config.dt_init_floor * 0.999).all() and (dt <= config.dt_max * 1.001).all()
    for ones in (
        layer.B_bias,
        layer.C_bias,
        layer.D,
        layer.mimo_z,
        layer.B_norm.weight,
        layer.norm.weight,
    ):
        assert torch.equal(ones, torch.ones_like(ones))
    assert torch.allclose(layer.mimo_x, torch.full_like(layer.mimo_x, 0.25))
    assert torch.allclose(layer.mimo_o, torch.full_like(layer.mimo_o, 0.25))
    assert layer.options.rotation == "halves"
    assert (
        build(LayerSpec("mamba3", Mamba3Config(d_state=16, headdim=8)), 64).options.rotation
        == "pairwise"
    )


def test_mamba3_aligned_projection_is_the_plain_one():
    """The sequence path pads in_proj's matmul to aligned rows; its inputs and weight
    gradient are those of the unpadded projection the decode step splits, and the parameter
    keeps its shape."""
    config = Mamba3Config(d_state=16, headdim=8, mimo_rank=2)
    layer = build(LayerSpec("mamba3", config), 64).double()
    width = layer.in_proj.out_features
    assert layer._padding > 0 and (width + layer._padding) % PROJECTION_ALIGNMENT == 0
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    probes = [torch.randn_like(t) for t in layer.project(x)[0]]
    results = []
    for aligned in (False, True):
        layer.zero_grad()
        inputs, _ = layer.project(x) if aligned else layer._split_inputs(layer.in_proj(x))
        assert inputs.x.stride(1) == width + (layer._padding if aligned else 0)
        sum((t * probe).sum() for t, probe in zip(inputs, probes, strict=True)).backward()
        results.append((inputs, layer.in_proj.weight.grad.clone()))
    (plain, plain_grad), (padded, padded_grad) = results
    for a, b in zip(plain, padded, strict=True):
        assert rel_err(b, a) <= 1e-14
    assert padded_grad.shape == (width, 64) and rel_err(padded_grad, plain_grad) <= 1e-14


def test_flops_grow_with_context_only_for_attention():
    attn = build(LayerSpec("attention", SMALL["attention"][0]), D_MODEL)
    mamba = build(LayerSpec("mamba3", SMALL["mamba3"][0]), D_MODEL)
    assert attn.flops_per_token(4096) > attn.flops_per_token(128)
    assert mamba.flops_per_token(4096) == mamba.flops_per_token(128)
    # projections dominate at short context: 2 FLOPs per weight
    assert attn.flops_per_token(1) == 2 * attn.num_params() + 2 * 2 * 4 * 8


def test_attention_matches_explicit_softmax_with_gqa():
    torch.manual_seed(2)
    layer = build(LayerSpec("attention", AttentionConfig(n_heads=4, n_kv_heads=2)), D_MODEL)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    layer = layer.double()
    q, k, v = layer._split_qkv(layer.qkv(x))
    pos = torch.arange(7)
    q, k = rope_rotate(q, pos, 10000.0), rope_rotate(k, pos, 10000.0)
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, 7, -1)
    assert rel_err(layer(x), layer.out_proj(expected)) <= 1e-12


def test_rope_scores_depend_on_relative_position_only():
    q, k = (
        torch.randn(1, 1, 1, 16, dtype=torch.float64),
        torch.randn(1, 1, 1, 16, dtype=torch.float64),
    )

    def score(m, n):
        qm = rope_rotate(q, torch.tensor([m]), 10000.0)
        kn = rope_rotate(k, torch.tensor([n]), 10000.0)
        return (qm * kn).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-10)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def test_attention_backend_on_cpu_is_sdpa_and_logged_once(caplog):
    from hybrid.layers.attention import select_backend

    select_backend.cache_clear()
    with caplog.at_level("INFO", logger="hybrid.layers.attention"):
        layer = build(LayerSpec("attention", AttentionConfig(n_heads=4)), D_MODEL)
        for _ in range(3):
            layer(torch.randn(1, 5, D_MODEL))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["attention backend: sdpa (device is cpu)"]
    with pytest.raises(ValueError, match="fa4"):
        select_backend("fa4", torch.device("cpu"), torch.bfloat16)


def test_grouped_gated_norm_module_forms_differ():
    y, z = torch.randn(2, 16), torch.randn(2, 16)
    pre = GroupedGatedRMSNorm(16, group_size=4, norm_before_gate=True)(y, z)
    post = GroupedGatedRMSNorm(16, group_size=4, norm_before_gate=False)(y, z)
    assert rel_err(pre, post) > 1e-2


def test_kv_cache_overflow_is_reported():
    layer = build(LayerSpec("attention", AttentionConfig(n_heads=4)), D_MODEL)
    cache = layer.allocate_cache(1, 4, device="cpu", dtype=torch.float32)
    layer(torch.randn(1, 4, D_MODEL), cache)
    with pytest.raises(ValueError, match="max_seqlen=4"):
        layer.step(torch.randn(1, D_MODEL), cache)


def test_layer_config_from_mapping():
    assert layer_config("mamba3", {"d_state": 32}) == Mamba3Config(d_state=32)
    with pytest.raises(ValueError, match=r"mamba3\.d_stat"):
        layer_config("mamba3", {"d_stat": 32})
