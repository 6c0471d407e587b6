"""The CuTe DSL decode kernel on the CPU: where nvidia-cutlass-dsl is installed (the `test`
extra installs it) every option compiles for an H100 (sm_90a) through the DSL and ptxas with
no GPU present, and the thread layout covers each state element once; everywhere, the
dispatch falls back cleanly when `cutlass` does not import. What the kernel computes is
checked on the GPU (tests/test_gpu_cute_step.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import ptx_load_params, random_inputs, random_state, random_weights

from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3Options
from hybrid.kernels.mamba3_decode import (
    decode_backend,
    mamba3_step,
    planned_decode_backend,
    warn_cute_missing,
)
from hybrid.kernels.mamba3_step_cute import (
    _launch_tensors,
    compiled_step,
    cute_available,
    shape_reason,
    step_config,
)
from hybrid.layers.mamba3 import Mamba3Config

needs_cutlass = pytest.mark.skipif(not cute_available(), reason="nvidia-cutlass-dsl missing")

CASES = [  # headdim, d_state, rank, rotation, norm, state dtype, token dtype, groups, angles
    (64, 128, 1, "pairwise", False, torch.float32, torch.bfloat16, 1, 32),
    (64, 128, 4, "halves", True, torch.bfloat16, torch.bfloat16, 1, 32),
    (48, 64, 2, "pairwise", True, torch.float32, torch.float16, 2, 16),
    (32, 48, 1, "halves", False, torch.bfloat16, torch.float32, 1, 0),
    (128, 256, 8, "halves", True, torch.float32, torch.bfloat16, 1, 64),
    (128, 64, 8, "pairwise", False, torch.float32, torch.bfloat16, 1, 16),  # y in rank chunks
    (48, 64, 3, "halves", True, torch.bfloat16, torch.bfloat16, 1, 16),  # rank not a power of 2
]


def _call(headdim, d_state, rank, rotation, norm, state_dtype, dtype, groups, angles, batch=2):
    """CPU tensors of one decode call (only their shapes, dtypes and addresses are used)."""
    heads = 4
    token = Mamba3Inputs(
        *(t[:, 0] for t in random_inputs(batch=batch, length=1, heads=heads, headdim=headdim,
                                         d_state=d_state, rank=rank, groups=groups,
                                         angles=angles, dtype=dtype))
    )  # fmt: skip
    weights = random_weights(heads=heads, headdim=headdim, d_state=d_state, rank=rank,
                             mimo=rank > 1, out_norm=norm, dtype=torch.float32)  # fmt: skip
    state = random_state(batch=batch, heads=heads, headdim=headdim, d_state=d_state,
                         rank=rank, angles=angles, dtype=torch.float32)  # fmt: skip
    state.ssm, state.k, state.x = state.ssm.to(state_dtype), state.k.to(dtype), state.x.to(dtype)
    return token, weights, state, Mamba3Options(rotation=rotation)


def _config(case):
    token, weights, state, options = _call(*case)
    tensors = _launch_tensors(token, weights, state, torch.empty_like(token.x))
    return step_config(token, weights, options, state, tensors)


@needs_cutlass
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[0]}-N{c[1]}-R{c[2]}-{c[3]}")
def test_kernel_compiles_for_sm90(case):
    cfg = _config(case)
    start = time.perf_counter()
    compiled = compiled_step(cfg, "sm_90a")
    print(f"compiled {case[:5]} in {time.perf_counter() - start:.2f}s")
    assert compiled is compiled_step(cfg, "sm_90a")  # cached, not recompiled


AMPERE_COMPILE = """
import sys
sys.path.insert(0, {tests!r})
from test_cute_step import CASES, _config
from hybrid.kernels.mamba3_step_cute import compiled_step
for arch in ("sm_80", "sm_86"):
    for case in (CASES[0], CASES[1]):
        print(compiled_step(_config(case), arch).__ptx__.split(".target")[1].split()[0])
"""


def _ptx_script_output(script: str, tmp_path: Path) -> str:
    """stdout of a compile script reading the kernel's PTX: in a subprocess, since the DSL
    reads CUTE_DSL_KEEP_PTX (the PTX named by the checks) once; in a scratch directory, since
    it also writes that PTX to a file in the working one."""
    done = subprocess.run(
        [sys.executable, "-c", script.format(tests=str(Path(__file__).parent))],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "CUTE_DSL_KEEP_PTX": "1"}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_cutlass
def test_kernel_compiles_for_ampere(tmp_path):
    """The step needs compute capability 8.0 (`unsupported_reason`), not Hopper, so `auto`
    picks it on Ampere too: SISO and MIMO compile for sm_80 and sm_86 (run on an H100 only)."""
    assert _ptx_script_output(AMPERE_COMPILE, tmp_path).split() == [
        "sm_80", "sm_80", "sm_86", "sm_86"
    ]  # fmt: skip


CHAINED_COMPILE = """
import sys
sys.path.insert(0, {tests!r})
from dataclasses import replace
from test_cute_step import CASES, _config
from hybrid.kernels.mamba3_step_cute import compiled_step
for case in (CASES[0], CASES[1]):
    for chained, early in ((False, False), (True, False), (True, True)):
        cfg = replace(_config(case), chained=chained, early_state=early)
        print(compiled_step(cfg, "sm_90a").__ptx__)
        print("@@@")
"""
TOKEN_PARAMS = set(range(8))  # x, z, b, c, dt, a, trap, angle: written by in_proj
STATE_PARAM = 19  # st_ssm


@needs_cutlass
def test_chained_kernel_waits_before_what_its_predecessor_may_write(tmp_path):
    """Launched by PDL (inside a CUDA graph on sm_90), the step waits for its predecessor
    before its first global load (hybrid/kernels/dependent_launch.py), unless its layer
    promised that the predecessor (in_proj) does not write the state (`early_state`): then it
    loads before the wait only what in_proj cannot have written (the state's first row
    batch, the cached k, x, γ and angles, weights) and every token input after it.
    Unchained it has no griddepcontrol at all."""
    ptxs = _ptx_script_output(CHAINED_COMPILE, tmp_path).split("@@@")[:-1]
    assert len(ptxs) == 6
    for plain, chained, early in (ptxs[0:3], ptxs[3:6]):
        assert "griddepcontrol" not in plain
        for ptx in (chained, early):
            assert "griddepcontrol.launch_dependents" in ptx.split("griddepcontrol.wait", 1)[1]
        assert "ld.global" not in chained.split("griddepcontrol.wait", 1)[0]
        before, after = early.split("griddepcontrol.wait", 1)
        first, every = ptx_load_params(before), ptx_load_params(before + "\n" + after)
        assert first and all(len(p) == 1 for p in every), first  # each load traced to one
        assert not set().union(*first) & TOKEN_PARAMS
        assert STATE_PARAM in set().union(*first)
        assert set().union(*every[len(first) :]) >= TOKEN_PARAMS


def test_state_loads_early_only_when_the_layer_promises(monkeypatch):
    """The state is loaded before the PDL wait only on a chained launch whose caller
    promised the predecessor does not write it (`state_settled`): a Mamba-3 layer's step,
    which follows its in_proj, promises; `mamba3_step` by default (steps of one state back
    to back, as the decode benchmark graphs them) does not."""
    import hybrid.kernels.mamba3_step_cute as cute_step
    import hybrid.layers.mamba3 as layer_module

    token, weights, state, options = _call(*CASES[0])
    tensors = _launch_tensors(token, weights, state, torch.empty_like(token.x))
    for is_chained in (False, True):
        monkeypatch.setattr(cute_step, "chained", lambda t, rows, c=is_chained: c)
        for settled in (False, True):
            cfg = step_config(token, weights, options, state, tensors, settled)
            assert cfg.chained == is_chained and cfg.early_state == (is_chained and settled)
        assert not step_config(token, weights, options, state, tensors).early_state

    promised = []

    def fake_step(*args, state_settled=False, **kwargs):
        promised.append(state_settled)
        return torch.zeros(args[0].x.shape)

    monkeypatch.setattr(layer_module, "mamba3_step", fake_step)
    layer = layer_module.Mamba3(64, Mamba3Config(d_state=16, headdim=16))
    cache = layer.allocate_cache(2, 8, device=torch.device("cpu"), dtype=torch.float32)
    layer.step(torch.randn(2, 64), cache)
    assert promised == [True]


@needs_cutlass
def test_occupancy_hint_and_rank_chunks():
    """For a bf16 state, 64 registers a thread are asked for where a thread holds <= 32 state
    values and R <= 4 (the benchmark's shapes; 48 for a SISO step of 256 threads), 80 for
    R > 4 at 256 threads, nowhere else, and only where the grid outnumbers the SMs; for an
    fp32 state never; y partials are reduced in rank chunks only where there are many of
    them and few state values (P128 N64 R8 fp32)."""
    from hybrid.kernels.mamba3_step_cute_kernel import Mamba3StepKernel

    def kernel(headdim, d_state, rank, state_dtype):
        case = (headdim, d_state, rank, "halves", False, state_dtype, torch.bfloat16, 1, 16)
        return Mamba3StepKernel(_config(case))

    for dtype in (torch.float32, torch.bfloat16):
        for d_state in (64, 128):
            for rank in (1, 2, 4):
                k = kernel(64, d_state, rank, dtype)
                five = rank == 1 and k.NT == 256  # 48 registers
                hinted = 5 if five else 65536 // (64 * k.NT)
                assert k.min_ctas == (hinted if dtype == torch.bfloat16 else 0) and rank == k.RC
        assert kernel(128, 64, 8, dtype).min_ctas == (3 if dtype == torch.bfloat16 else 0)
        assert kernel(128, 256, 8, dtype).min_ctas == 0
        assert kernel(128, 256, 8, dtype).RC == 8  # 64 state values a thread: one chunk
    assert kernel(128, 64, 8, torch.float32).RC == 4
    assert kernel(128, 64, 8, torch.bfloat16).RC == 8
    # a grid of at most one CTA an SM (batch 1): no hint at all
    many = _config((64, 128, 4, "halves", False, torch.bfloat16, torch.bfloat16, 1, 16))
    assert Mamba3StepKernel(many).min_ctas == 4
    assert Mamba3StepKernel(replace(many, many_ctas=False)).min_ctas == 0


@needs_cutlass
@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16, 32])
def test_many_value_lane_reduction(lanes):
    """_reduce_many's bookkeeping with numpy stand-ins (one entry per lane of a row): each
    lane's sums are the row totals of the indices it reports, and every index is reported."""
    import numpy as np

    from hybrid.kernels.mamba3_step_cute_kernel import _reduce_many

    rng = np.random.default_rng(0)
    lane = np.arange(lanes)
    for count in (1, 2, 3, 5, 8, 12, 16, 32, 48, 64):
        parts = [rng.standard_normal(lanes) for _ in range(count)]
        sums, slots = _reduce_many(
            parts, lanes, lane,
            select=lambda c, a, b: np.where(c, a, b),
            shuffle=lambda v, d: np.broadcast_to(v, (lanes,))[lane ^ d],
            slot=lambda i: np.full(lanes, i),
        )  # fmt: skip
        totals = np.array([p.sum() for p in parts])
        seen = set()
        for value, index in zip(sums, slots, strict=True):
            value = np.broadcast_to(value, (lanes,))
            index = np.broadcast_to(index, (lanes,))
            np.testing.assert_allclose(value, totals[index], rtol=1e-12, atol=1e-12)
            seen.update(index.tolist())
        assert seen == set(range(count))
        assert len(sums) == max(1, -(-count // lanes)) or count < lanes


@needs_cutlass
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[0]}-N{c[1]}-R{c[2]}")
def test_threads_cover_every_state_element_once(case):
    """The CTA's (row group, lane, vector) mapping hits each (p, n) once; rows past P only
    on clamped reads, columns never past N."""
    from hybrid.kernels.mamba3_step_cute_kernel import Mamba3StepKernel

    k = Mamba3StepKernel(_config(case))
    assert k.T & (k.T - 1) == 0 and 32 % k.T == 0 and k.E % k.V == 0
    hits = torch.zeros(k.P, k.N, dtype=torch.int32)
    for tid in range(k.NT):
        warp, lane = divmod(tid, 32)
        group, lt = warp * (32 // k.T) + lane // k.T, lane % k.T
        for i in range(k.RT):
            p = group + k.NG * i
            if p < k.P:
                for c in range(k.EV):
                    start = (c * k.T + lt) * k.V
                    assert start + k.V <= k.N
                    hits[p, start : start + k.V] += 1
    assert bool((hits == 1).all())


@needs_cutlass
def test_vector_width_follows_dtype_and_alignment():
    cfg = _config(CASES[0])
    assert cfg.ssm_align == 16 and cfg.vector == 4 and cfg.lanes_per_row == 32
    assert _config(CASES[1]).vector == 8
    assert replace(cfg, ssm_align=8).vector == 2  # a state view off a 16-byte boundary


def test_shape_limits_name_the_reason():
    assert shape_reason(64, 128, 4, 32) is None
    assert shape_reason(128, 256, 8, 128) is None  # the largest shape the README promises
    assert "rank" in shape_reason(64, 128, 9, 32)
    assert "smem" in shape_reason(1024, 256, 8, 64)


def test_dispatch_without_cutlass(monkeypatch, request):
    """With `cutlass` not importable: auto stays on torch (CPU) / triton (CUDA sizes), a
    forced cute raises naming the reason and the allowed values, and the step still runs.
    Falling back on CUDA warns once that MIMO's decode latency is then overstated; the CPU's
    torch step, which the CuTe DSL would not replace, does not warn."""
    monkeypatch.setitem(sys.modules, "cutlass", None)  # `import cutlass` raises ImportError
    cute_available.cache_clear()  # asked again with `cutlass` gone, and after the test
    request.addfinalizer(cute_available.cache_clear)
    assert not cute_available()
    warn_cute_missing.cache_clear()
    token, weights, state, options = _call(*CASES[0][:5], torch.float32, torch.float32, 1, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning off CUDA
        assert decode_backend(token, state) == "torch"
        assert planned_decode_backend("auto", False, 64, 128, 1) == "torch"
    with pytest.raises(ValueError, match=r"nvidia-cutlass-dsl is not installed.*allowed"):
        decode_backend(token, state, "cute")
    with pytest.warns(UserWarning, match=r"runs a fallback step.*overstate what MIMO"):
        assert planned_decode_backend("auto", True, 64, 128, 4) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert planned_decode_backend("auto", True, 48, 128, 1) == "torch"
    warn_cute_missing.cache_clear()
    out = mamba3_step(token, weights, options, state)
    assert out.shape == token.x.shape and torch.isfinite(out).all()


@needs_cutlass
def test_auto_plans_cute_on_cuda_when_installed():
    assert planned_decode_backend("auto", True, 48, 96, 4) == "cute"
    assert planned_decode_backend("auto", True, 128, 256, 16) == "triton"  # rank > 8


def test_layer_config_validates_decode_backend():
    Mamba3Config(decode_backend="cute").validate(512)
    with pytest.raises(ValueError, match="cute"):
        Mamba3Config(decode_backend="cuda").validate(512)
