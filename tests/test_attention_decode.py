"""The split-KV decode attention kernel: what it computes (under the Triton interpreter, against
softmax attention in float64) and how many splits it cuts a context into."""

from __future__ import annotations

import pytest
import torch
from helpers import run_interpreted

from hybrid.kernels.attention_decode import (
    MAX_SPLITS,
    MIN_SPLIT_KEYS,
    PROGRAMS_PER_SM,
    append_token,
    head_dim_reason,
    split_count,
)
from hybrid.kernels.kv_prompt import append_prompt
from hybrid.layers.attention import select_decode_backend


def test_split_kv_kernel_matches_attention_under_the_interpreter():
    out = run_interpreted("check_attention_decode.py")
    assert "splits 7" in out and "worst" in out


def test_splits_fill_the_sms_without_cutting_below_the_minimum():
    sms = 132
    # batch 1, 2 KV heads, 4k cache: 132 splits wanted, 64 of 64 keys fit
    assert split_count(2, 4096, sms) == 4096 // MIN_SPLIT_KEYS
    # a long cache: as many as fill the SMs PROGRAMS_PER_SM times, at most MAX_SPLITS
    assert split_count(4, 1 << 20, sms) == PROGRAMS_PER_SM * sms // 4
    assert split_count(2, 1 << 20, sms) == MAX_SPLITS
    # a short cache is not split at all
    assert split_count(1, MIN_SPLIT_KEYS, sms) == 1
    assert split_count(1, 10, sms) == 1
    # sized first: no split wholly past the capacity (2,058: 33 of 64, not 16 of 192, 5 past)
    assert split_count(2, 2058, sms) == 33


def test_batches_that_cover_the_sms_one_to_four_times_take_one_split():
    sms = 132
    # the batch about once over the SMs: still split to cover them twice
    assert split_count(64 * 2, 32768, sms) == 3  # 128 programs of D 64
    assert split_count(16 * 4, 32768, sms, head_dim=128) == 5  # 64 of D 128: as many
    # 1.5-4.5 times: one split, no combine kernel (256-512 of D 64, 128-256 of D 128)
    assert split_count(32 * 8, 32768, sms) == split_count(64 * 8, 2048, sms) == 1
    assert split_count(32 * 4, 8192, sms, head_dim=128) == 1
    assert split_count(64 * 4, 8192, sms, head_dim=128) == 1
    # from 4.5 times on: two (1,024 of D 64, 512 of D 128, and more)
    assert split_count(128 * 8, 32768, sms) == split_count(128 * 4, 8192, sms, head_dim=128) == 2
    assert split_count(256 * 8, 32768, sms) == 2
    # a cache too short for two splits of MIN_SPLIT_KEYS keys gets one
    assert split_count(128 * 8, MIN_SPLIT_KEYS, sms) == 1


def test_the_one_kernel_appends_refuse_an_odd_head_dim():
    """NoPE allows an odd head dim; the append kernels move a head as two halves, so they
    refuse one (the layer writes such heads with PyTorch ops: tests/test_gpu.py)."""
    q, k = torch.randn(1, 3, 2, 25), torch.randn(1, 3, 1, 25)
    cache, seqlens = torch.zeros(1, 1, 8, 25), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"append_prompt takes an even head_dim.*got 25"):
        append_prompt(q, k, k, cache, cache.clone(), seqlens, 0, None)
    with pytest.raises(ValueError, match=r"append_token takes an even head_dim.*got 25"):
        append_token(q[:, :1], k[:, :1], k[:, :1], cache, cache.clone(), seqlens, None)


def test_head_dims_the_kernel_takes():
    assert all(head_dim_reason(d) is None for d in (16, 32, 64, 128, 256))
    assert all("head_dim" in head_dim_reason(d) for d in (8, 48, 96, 512))


def test_decode_backend_off_cuda_is_sdpa():
    backend, why = select_decode_backend("auto", torch.device("cpu"), torch.float32, 64)
    assert backend == "sdpa" and why
