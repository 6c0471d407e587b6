"""KV-cache decode at device positions: a step reads its position from `KVCache.seqlens`
(so one CUDA graph serves every position) and computes what the host-offset paths compute."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from hybrid.cache import KVCache
from hybrid.config import LayerSpec
from hybrid.layers import build
from hybrid.layers.attention import AttentionConfig, sdpa_decode

D_MODEL = 32


def _attention(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AttentionConfig(n_heads=4, n_kv_heads=2, **options)
    return build(LayerSpec("attention", config), D_MODEL).double()


@pytest.mark.parametrize("rope", [True, False])
def test_tensor_position_steps_equal_int_position_prefills(rope):
    """Steps (device positions, masked whole buffer) against a continuation prefill (host
    offsets, sliced keys) and the cache-free forward; stale keys past the length are ignored."""
    layer = _attention(rope=rope)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    full = layer(x)
    stepped = layer.allocate_cache(2, 16, device="cpu", dtype=torch.float64)
    stepped.k.fill_(1e3)  # garbage beyond the filled length must be masked
    chunked = layer.allocate_cache(2, 16, device="cpu", dtype=torch.float64)
    layer(x[:, :4], stepped), layer(x[:, :4], chunked)
    steps = torch.stack([layer.step(x[:, t], stepped) for t in range(4, 9)], dim=1)
    chunk = layer(x[:, 4:], chunked)
    assert rel_err(steps, chunk) <= 1e-12 and rel_err(steps, full[:, 4:]) <= 1e-12
    assert stepped.seqlens.tolist() == [9, 9] and stepped.length == chunked.length == 9


def test_decode_reads_each_sequence_at_its_own_position():
    """`seqlens` is per sequence: a sequence at a shorter length attends to fewer keys."""
    torch.manual_seed(1)
    cache = KVCache.empty(2, 2, 8, 4, device="cpu", dtype=torch.float64)
    cache.k.normal_(), cache.v.normal_()
    q = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    cache.seqlens.copy_(torch.tensor([3, 6], dtype=torch.int32))
    out = sdpa_decode(q, cache)
    for b, n in enumerate((3, 6)):
        keys = cache.k[b, :, :n].repeat_interleave(2, dim=0)  # (H, n, D), GQA groups of 2
        values = cache.v[b, :, :n].repeat_interleave(2, dim=0)
        weights = (q[b, 0, :, None] @ keys.transpose(-1, -2) / 2.0).softmax(-1)
        assert rel_err(out[b, 0], (weights @ values)[:, 0]) <= 1e-12


def test_rewind_and_advance_move_host_and_device_counts():
    cache = KVCache.empty(3, 1, 8, 4, device="cpu", dtype=torch.float32)
    cache.rewind(5)
    assert cache.length == 5 and cache.seqlens.tolist() == [5, 5, 5]
    cache.advance(2)  # a replayed graph already moved the device count
    assert cache.length == 7 and cache.seqlens.tolist() == [5, 5, 5]
    cache.append_token(torch.zeros(3, 1, 1, 4), torch.zeros(3, 1, 1, 4))
    with pytest.raises(ValueError, match="max_seqlen=8"):
        cache.append_token(torch.zeros(3, 1, 1, 4), torch.zeros(3, 1, 1, 4))
