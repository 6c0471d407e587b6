"""The Triton prefill kernels (scan, B/C rotation, output gate, angle sums) and the fused
norm/SwiGLU kernels run by Triton's interpreter on the CPU (a subprocess: the interpreter is
chosen when kernels are defined) against the float64 oracle or the PyTorch functions, forward
and every gradient; and the scan dispatch."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_inputs, random_state, random_weights, rel_err, run_interpreted

from hybrid.kernels.chunk_table import ChunkTable
from hybrid.kernels.chunked_cumsum import CARRY_BLOCK, sequence_strip
from hybrid.kernels.mamba3_common import Mamba3Options
from hybrid.kernels.mamba3_prefill_core import (
    MIN_SEGMENT_CHUNKS,
    MIN_SEGMENTS,
    state_pass_segments,
)
from hybrid.kernels.mamba3_scan import mamba3_scan, scan_backend
from hybrid.kernels.reference import mamba3_reference


def test_prefill_kernels_match_the_oracle_under_the_interpreter():
    stdout = run_interpreted("check_mamba3_prefill.py")
    assert stdout.count("R=") == 6 and "segment cumsum" in stdout and "worst" in stdout
    # both paths of the chunked sums, on their own and inside the prefill cases
    assert stdout.count("chunk-parallel") == 4 and stdout.count("one program a sequence") == 4
    assert "core with and without D" in stdout


def test_fused_norm_and_swiglu_kernels_match_pytorch_under_the_interpreter():
    stdout = run_interpreted("check_fused_norms.py")
    # every gated norm form at 16 and at 2 forward rows a program
    assert stdout.count("gated norm") == 8 and "swiglu" in stdout and "worst" in stdout
    assert "forward rows a program: 16" in stdout and "forward rows a program: 2\n" in stdout


def test_rope_kernel_matches_pytorch_under_the_interpreter():
    stdout = run_interpreted("check_rope.py")
    assert stdout.count("positions") == 8 and "worst" in stdout
    assert stdout.count("bit for bit as expected") == 8


def test_token_major_passes_projection_slices_without_a_copy():
    """The kernels read in_proj slices through their token strides: a column slice (each
    token's entries contiguous) is passed as is, anything else is copied contiguous."""
    from hybrid.kernels.launch_args import token_major

    wide = torch.randn(7, 3 * 4 * 16 + 5)
    x = wide[:, 5 : 5 + 4 * 16].unflatten(-1, (4, 16))  # (T, H, P) slice, token stride 197
    assert token_major(x).data_ptr() == x.data_ptr() and token_major(x).stride(0) == 197
    unsqueezed = x.unsqueeze(1)  # SISO v: (T, 1, H, P)
    assert token_major(unsqueezed).data_ptr() == x.data_ptr()
    for needs_copy in (x.transpose(1, 2), x[:, :, ::2], wide[:1, :16].expand(7, 16)):
        made = token_major(needs_copy)
        assert made.is_contiguous() and torch.equal(made, needs_copy)


def test_dispatch_keeps_the_cpu_on_the_chunked_path():
    inputs = random_inputs(dtype=torch.float32)
    assert scan_backend(inputs, 16) == "chunked"
    assert scan_backend(inputs, 16, "triton") == "triton"
    with pytest.raises(ValueError, match="allowed"):
        scan_backend(inputs, 16, "cuda")


def test_forcing_triton_on_a_shape_it_cannot_take_names_the_reason():
    inputs = random_inputs(headdim=12, dtype=torch.float32)
    weights = random_weights(headdim=12, dtype=torch.float32)
    with pytest.raises(ValueError, match="headdim=12"):
        mamba3_scan(inputs, weights, Mamba3Options(), backend="triton")


def test_forcing_triton_on_the_cpu_names_the_device(monkeypatch):
    """Not Triton's "0 active drivers" from deep in its launcher."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = random_inputs(headdim=16, dtype=torch.float32)
    weights = random_weights(headdim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"does not take tensors on cpu \(it runs on CUDA\)"):
        mamba3_scan(inputs, weights, Mamba3Options(), backend="triton")


def test_chunked_varlen_equals_each_sequence_on_its_own():
    lengths = [7, 30, 1]
    inputs = random_inputs(batch=1, length=sum(lengths))
    weights = random_weights()
    state = random_state(batch=len(lengths))
    bounds = [0, 7, 37, 38]
    out, final = mamba3_scan(inputs, weights, Mamba3Options(), state, 8, cu_seqlens=bounds)
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        piece = type(inputs)(*(t[:, start:end] for t in inputs))
        row = type(state)(*(t[i : i + 1] for t in state.tensors()))
        expected, expected_final = mamba3_reference(piece, weights, Mamba3Options(), row)
        assert rel_err(out[:, start:end], expected) <= 1e-10
        assert rel_err(final.ssm[i : i + 1], expected_final.ssm) <= 1e-10
    with pytest.raises(ValueError, match="cu_seqlens"):
        mamba3_scan(inputs, weights, Mamba3Options(), cu_seqlens=[0, 5, 30])


def test_cached_device_tensors_built_under_inference_mode_serve_training():
    """The chunk table and RoPE's frequencies are cached per layout / head size. Built first
    under inference mode (an evaluation, a latency measurement, `generate`), they must still
    be normal tensors: a later training step saves them for its backward."""
    from hybrid.kernels.chunk_table import chunk_table
    from hybrid.kernels.rope import inverse_frequencies

    cpu = torch.device("cpu")
    length = int(torch.randint(40, 400, ()))  # a layout and a base no other test caches
    with torch.inference_mode():
        table = chunk_table((0, 37, 37 + length), 16, cpu)
        freqs = inverse_frequencies(48, 1000.0 + length, cpu)
    for cached in (table.last_token, table.seq_starts, table.tok0, freqs):
        assert not cached.is_inference()

    class SavesIt(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, saved):
            ctx.save_for_backward(saved)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2, None

    x = torch.randn(3, requires_grad=True)
    for cached in (table.seq_starts, freqs):
        SavesIt.apply(x, cached).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 4.0))


def test_short_sequences_of_a_small_batch_take_the_one_launch_sums():
    """The angles of a batch-1 prefill (512 tokens, 16 heads x 32) are summed in one launch,
    8 columns a program (the H100 sweep's best); a batch of 64 such sequences, or sequences
    of more chunks than one carry scan step, take the three chunk-parallel kernels."""

    def table(n_seq: int, length: int, chunk: int) -> ChunkTable:
        return ChunkTable.build(list(range(0, n_seq * length + 1, length)), chunk, "cpu")

    assert sequence_strip(table(1, 512, 64), 512, 512) == 8
    assert sequence_strip(table(1, 512, 64), 512, 16) == 1  # the reverse log-decay sums
    assert sequence_strip(table(32, 512, 64), 32 * 512, 16) == 8
    assert sequence_strip(table(64, 512, 64), 64 * 512, 512) == 0  # 16M sums
    assert sequence_strip(table(1, (CARRY_BLOCK + 1) * 16, 16), 33 * 16, 512) == 0
    assert sequence_strip(table(1, 2048, 64), 2048, 16) == 0  # past the padded-token bound


def test_state_pass_is_cut_into_segments_only_where_its_programs_leave_sms_idle():
    """Segments cost a fix-up pass over the stored states: worth it only when the walks are
    too few to fill half the GPU (132 SMs: an H100; 128 programs ran slower segmented),
    never shorter than MIN_SEGMENT_CHUNKS, and at least MIN_SEGMENTS of them."""
    assert state_pass_segments(programs=128, chunks=1024, sms=132) == 1
    segments = state_pass_segments(programs=48, chunks=32, sms=132)  # batch-1, 12 heads
    assert segments >= MIN_SEGMENTS and 32 // segments >= MIN_SEGMENT_CHUNKS
    assert state_pass_segments(programs=64, chunks=16, sms=132) == MIN_SEGMENTS  # 1 x 1,024
    # 1 x 512 tokens: two segments of 4 chunks would not pay for the fix-up
    assert state_pass_segments(programs=64, chunks=2 * MIN_SEGMENT_CHUNKS + 1, sms=132) == 1
    segments = state_pass_segments(programs=48, chunks=32, sms=132)  # batch-1, 12 heads
    assert segments > 1 and 32 // segments >= MIN_SEGMENT_CHUNKS
    assert state_pass_segments(programs=48, chunks=MIN_SEGMENT_CHUNKS + 1, sms=132) == 1
