"""The batch-1 projection kernel (`small_batch_linear`): what it computes (under the Triton
interpreter), its tiling rule, and that the model's projections keep nn.Linear's parameters
and, off CUDA, its results (with a block's norm folded in: those of the norm and then the
projection)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import run_interpreted

from hybrid.config import ModelConfig
from hybrid.kernels.norms import add_rms_norm, swiglu
from hybrid.kernels.small_batch_linear import (
    _loads_early,
    _preloaded_columns,
    add_rms_norm_linear,
    fold_pays,
    small_batch_linear,
    swiglu_linear,
    takes,
    tiling,
)
from hybrid.layers.linear import Linear
from hybrid.model import HybridLM


def test_kernel_matches_linear_under_the_interpreter():
    out = run_interpreted("check_small_batch_linear.py")
    assert "N=4113 K=1030" in out and "rows=3" in out and "worst" in out


def test_tiling_covers_narrow_outputs_with_many_programs():
    # 4 rows a program up to 4,096 features (a 512-wide output is 128 programs), 16 beyond;
    # only the 4-row tiles load their first step before the PDL wait
    assert tiling(512, 1024) == (4, 512) and tiling(4096, 512) == (4, 512)
    assert tiling(8800, 2048) == (16, 512)
    assert _loads_early(True, 4) and not _loads_early(True, 16) and not _loads_early(False, 4)
    # one K step where K is at most 512, as a power of two
    assert tiling(256, 50)[1] == 64 and tiling(256, 16)[1] == 16
    # a tile loaded before the wait holds its whole row, up to 2,048 columns
    assert _preloaded_columns(1024, 512) == 1024 and _preloaded_columns(1376, 512) == 2048
    assert _preloaded_columns(512, 512) == 512 and _preloaded_columns(50, 64) == 64
    assert _preloaded_columns(2752, 512) == 512


def test_norms_fold_into_one_step_rows_of_four_row_tiles():
    # d_model 512's in-projections, not its 50,257-wide head nor d_model 1024's in_proj
    folds = {
        shape: fold_pays(torch.empty(shape))
        for shape in [(2384, 512), (4096, 512), (4097, 512), (768, 513)]
    }
    assert folds == {(2384, 512): True, (4096, 512): True, (4097, 512): False,
                     (768, 513): False}  # fmt: skip


def test_off_cuda_it_is_linear():
    weight = torch.randn(37, 50)
    x = torch.randn(1, 50)
    assert not takes(x, weight)
    assert torch.equal(small_batch_linear(x, weight), F.linear(x, weight))
    h = torch.randn(1, 100)
    assert torch.equal(swiglu_linear(h, weight), F.linear(swiglu(h), weight))
    scale = torch.rand(50) + 0.5
    for delta in (None, torch.randn(1, 50)):
        summed, normed = add_rms_norm(x, delta, scale, 1e-5)
        folded = add_rms_norm_linear(x, delta, scale, 1e-5, weight)
        assert torch.equal(folded[0], summed) and torch.equal(folded[1], F.linear(normed, weight))


def test_model_projections_keep_linear_parameters():
    config = ModelConfig.from_pattern("M-*-", d_model=64)
    model = HybridLM(config)
    projections = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # in_proj, out_proj, two SwiGLU pairs, qkv, out_proj, the head
    assert len(projections) == 9 and all(isinstance(m, Linear) for m in projections)
    assert all(m.bias is None for m in projections)
    names = list(model.state_dict())  # checkpoints saved before load as they did
    assert "blocks.0.layer.in_proj.weight" in names and "lm_head.weight" in names
    assert not any(name.endswith("proj.bias") for name in names)
