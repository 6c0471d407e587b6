"""Every Triton kernel compiles for an H100 (sm_90) on this CPU-only machine: Triton lowers to
PTX and runs its bundled ptxas without a GPU. The interpreter tests check what the kernels
compute; this catches what only the compiler rejects (non-constexpr globals, unsupported
constructs, type mismatches in tl.dot) before GPU time is spent."""

from __future__ import annotations

import inspect

import pytest
import triton
from helpers import ptx_load_params
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hybrid.kernels import (
    attention_decode,
    chunked_cumsum,
    fused_norms,
    kv_prompt,
    mamba3_coefficients,
    mamba3_gate,
    mamba3_prefill_core,
    mamba3_step_triton,
    mimo_values,
    rope,
    rotated_bc,
    segment_cumsum,
    small_batch_linear,
    state_handoff,
)

FLOAT_ARGS = {"eps", "a_floor", "bc_eps", "out_eps", "scale"}
LAUNCH_OPTIONS = {"enable_fp_fusion": True}  # as every launch in hybrid/kernels asks
INT8_POINTERS = {"last_ptr"}
INT64_POINTERS = {"ends_ptr"}
BF16_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "dy_ptr", "x_ptr", "y_ptr", "dq_ptr", "dk_ptr",
                 "dv_ptr", "states_ptr", "dstates_ptr"}  # fmt: skip
INT_POINTERS = {"starts_ptr", "tok0_ptr", "ntok_ptr", "seq_chunk0_ptr", "seq_starts_ptr",
                "pos_ptr", "chunk_seq_ptr", "seqlens_ptr", "tok_ptr"}  # fmt: skip
LOADS_WEIGHTS_FIRST = {"_norm_fwd_kernel"}  # before its PDL wait; the projections: PRELOAD
PREFILL = {"N": 128, "P": 64, "R": 1, "BT": 64, "BN": 64, "PRECISION": "tf32"}
UNGATED = {"GATE": False, "GATE_MIMO": False, "HAS_NORM": False}
GEMV = {"BN": 16, "BK": 512, "GATED": False, "NORMED": False, "HAS_DELTA": False,
        "GATHER": False, "PDL": False, "PRELOAD": False}  # fmt: skip
GEMV_BF16 = {"x_ptr", "w_ptr", "y_ptr"}

CASES = [  # (kernel, constexprs, bf16 pointers)
    (segment_cumsum._segment_cumsum_kernel,
     {"BT": 16, "BC": 4, "HAS_INIT": True, "REVERSE": False, "WRAP": True}, set()),
    (segment_cumsum._segment_cumsum_kernel,
     {"BT": 128, "BC": 32, "HAS_INIT": False, "REVERSE": True, "WRAP": False}, set()),
    (chunked_cumsum._chunk_sums_kernel, {"BT": 64, "BC": 64, "OUTER": True, "WRAP": True},
     set()),
    (chunked_cumsum._chunk_sums_kernel, {"BT": 16, "BC": 32, "OUTER": False, "WRAP": False},
     set()),
    (chunked_cumsum._chunk_prefix_kernel,
     {"BT": 16, "BC": 64, "OUTER": True, "REVERSE": False, "WRAP": True, "HAS_INIT": True},
     set()),
    (chunked_cumsum._chunk_prefix_kernel,
     {"BT": 64, "BC": 32, "OUTER": False, "REVERSE": True, "WRAP": False, "HAS_INIT": False},
     set()),
    (chunked_cumsum._sequence_sums_kernel,
     {"NB": 8, "BT": 64, "BC": 8, "OUTER": True, "REVERSE": False, "WRAP": True,
      "HAS_INIT": True}, set()),
    (chunked_cumsum._sequence_sums_kernel,
     {"NB": 32, "BT": 16, "BC": 1, "OUTER": False, "REVERSE": True, "WRAP": False,
      "HAS_INIT": False}, set()),
    (mamba3_coefficients._coef_fwd_kernel, {"BT": 4, "HP": 32, "SP": 32, "HEAVY_TAIL": True},
     {"dt_ptr", "a_ptr", "trap_ptr", "ang_ptr"}),
    (mamba3_coefficients._coef_bwd_kernel, {"BT": 2, "HP": 64, "SP": 32, "HEAVY_TAIL": False},
     set()),
    (mamba3_coefficients._coef_bwd_kernel,  # bf16 raw inputs: gradients stored as bf16
     {"BT": 4, "HP": 32, "SP": 32, "HEAVY_TAIL": True},
     {"dt_ptr", "a_ptr", "trap_ptr", "ang_ptr", "ddt_ptr", "da_ptr", "dtrap_ptr", "dang_ptr"}),
    (mamba3_prefill_core._state_pass_kernel,
     {"DX": 64, "DY": 128, "R": 4, "BT": 64, "BX": 64, "BY": 64, "HAS_INIT": True,
      "REVERSE": False, "HAS_MX": True, "SEGMENTED": True, "PRECISION": "tf32"}, BF16_POINTERS),
    (mamba3_prefill_core._state_pass_kernel,
     {"DX": 64, "DY": 128, "R": 1, "BT": 64, "BX": 64, "BY": 32, "HAS_INIT": False,
      "REVERSE": True, "HAS_MX": False, "SEGMENTED": False, "PRECISION": "ieee"}, set()),
    (mamba3_prefill_core._state_fixup_kernel,
     {"DX": 64, "DY": 128, "R": 4, "BT": 64, "BX": 64, "BY": 128, "REVERSE": True},
     BF16_POINTERS),
    (mamba3_prefill_core._chunk_output_kernel,
     {**PREFILL, **UNGATED, "BP": 64, "HAS_MX": False, "HAS_D": True}, BF16_POINTERS),
    (mamba3_prefill_core._chunk_output_kernel,
     {**PREFILL, **UNGATED, "R": 2, "BP": 32, "HAS_MX": True, "HAS_D": False,
      "PRECISION": "ieee"}, set()),
    (mamba3_prefill_core._chunk_output_kernel,
     {**PREFILL, **UNGATED, "R": 4, "BN": 128, "BP": 64, "HAS_MX": True, "HAS_D": True},
     BF16_POINTERS),
    (mamba3_prefill_core._chunk_output_kernel,  # a prefill's: the output gate fused
     {**PREFILL, "R": 4, "BN": 128, "BP": 64, "HAS_MX": True, "HAS_D": True, "GATE": True,
      "GATE_MIMO": True, "HAS_NORM": True}, BF16_POINTERS | {"z_ptr", "mz_ptr", "mo_ptr"}),
    (mamba3_prefill_core._chunk_output_kernel,
     {**PREFILL, "BP": 64, "HAS_MX": False, "HAS_D": True, "GATE": True, "GATE_MIMO": False,
      "HAS_NORM": False}, BF16_POINTERS | {"z_ptr"}),
    (mamba3_prefill_core._chunk_grad_kernel,
     {**PREFILL, "BN": mamba3_prefill_core.GRAD_BLOCK_N, "HAS_D": True}, BF16_POINTERS),
    (mamba3_prefill_core._chunk_grad_kernel,
     {**PREFILL, "BN": mamba3_prefill_core.GRAD_BLOCK_N, "R": 4, "HAS_D": False,
      "PRECISION": "ieee"}, set()),
    (rotated_bc._rotated_bc_fwd_kernel, {"N": 128, "R": 1, "BT": 32, "HB": 8, "PAIRWISE": True,
                                         "STAGES": 1},
     {"k_ptr", "q_ptr"}),
    (rotated_bc._rotated_bc_fwd_kernel, {"N": 64, "R": 4, "BT": 16, "HB": 4, "PAIRWISE": False,
                                         "STAGES": 3}, set()),
    (rotated_bc._rotated_bc_bwd_kernel, {"N": 64, "R": 4, "BT": 8, "HB": 2, "PAIRWISE": False,
                                         "STAGES": 3},
     {"dk_ptr", "dq_ptr"}),
    (rotated_bc._rotated_bc_bwd_kernel,  # one head split: d raw B/C stored in their dtype
     {"N": 128, "R": 1, "BT": 16, "HB": 32, "PAIRWISE": True, "STAGES": 3},
     {"b_ptr", "c_ptr", "dk_ptr", "dq_ptr", "db_ptr", "dc_ptr"}),
    (state_handoff._initial_state_kernel,  # a float32 state, MIMO
     {"P": 64, "N": 128, "R": 4, "BP": 32, "HAS_MX": True}, {"k_ptr", "x_ptr"}),
    (state_handoff._initial_state_kernel,  # a bf16 state
     {"P": 32, "N": 64, "R": 1, "BP": 32, "HAS_MX": False}, {"ssm_ptr", "k_ptr", "x_ptr"}),
    (state_handoff._final_state_kernel,
     {"P": 64, "N": 128, "R": 4, "BP": 32, "SB": 32, "HAS_MX": True},
     {"k_ptr", "x_ptr", "kc_ptr", "xc_ptr"}),
    (state_handoff._final_state_kernel,
     {"P": 128, "N": 256, "R": 1, "BP": 16, "SB": 64, "HAS_MX": False},
     {"k_ptr", "x_ptr", "kc_ptr", "xc_ptr", "ssm_ptr"}),
    (kv_prompt._prompt_kernel,  # bf16, GQA, RoPE
     {"H": 8, "KV": 2, "HALF": 32, "HP": 32, "BT": 16, "ROPE": True},
     {"q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_out_ptr", "k_cache_ptr", "v_cache_ptr"}),
    (kv_prompt._prompt_kernel,  # float32, NoPE, head dim 96
     {"H": 0, "KV": 4, "HALF": 48, "HP": 64, "BT": 16, "ROPE": False}, set()),
    (mimo_values._values_bwd_kernel, {"R": 8, "P": 128, "BT": 16},
     {"x_ptr", "dxr_ptr", "dx_ptr"}),
    (mamba3_gate._gate_fwd_kernel, {"R": 4, "P": 64, "BT": 16, "HAS_MIMO": True,
                                    "HAS_NORM": True}, {"y_ptr", "z_ptr", "out_ptr"}),
    (mamba3_gate._gate_bwd_kernel, {"R": 1, "P": 64, "BT": 16, "HAS_MIMO": False,
                                    "HAS_NORM": True, "ROLLED": False},
     {"y_ptr", "z_ptr", "dy_ptr"}),
    (mamba3_gate._gate_bwd_kernel, {"R": 2, "P": 128, "BT": 16, "HAS_MIMO": True,
                                    "HAS_NORM": False, "ROLLED": False}, set()),
    (mamba3_gate._gate_bwd_kernel, {"R": 8, "P": 64, "BT": 16, "HAS_MIMO": True,
                                    "HAS_NORM": True, "ROLLED": True}, set()),
    (fused_norms._norm_fwd_kernel, {"GS": 2048, "BLOCK": 2048, "HAS_GATE": False,
                                    "BEFORE_GATE": True, "HAS_WEIGHT": True,
                                    "HAS_RESIDUAL": False, "ROWS": 16, "PDL": False},
     {"x_ptr", "out_ptr"}),
    (fused_norms._norm_fwd_kernel,  # a bf16 block output added into a float32 stream,
     {"GS": 384, "BLOCK": 512, "HAS_GATE": False, "BEFORE_GATE": True, "HAS_WEIGHT": True,
      "HAS_RESIDUAL": True, "ROWS": 16, "PDL": True}, {"d_ptr", "out_ptr"}),  # normed in bf16
    (fused_norms._norm_bwd_kernel, {"GS": 64, "BLOCK": 64, "HAS_GATE": True,
                                    "BEFORE_GATE": False, "HAS_WEIGHT": True,
                                    "HAS_RESIDUAL": False, "DELTA_GRAD": False, "ROWS": 16},
     {"x_ptr", "z_ptr", "do_ptr", "dx_ptr"}),
    (fused_norms._norm_bwd_kernel, {"GS": 768, "BLOCK": 1024, "HAS_GATE": False,
                                    "BEFORE_GATE": True, "HAS_WEIGHT": True,
                                    "HAS_RESIDUAL": True, "DELTA_GRAD": True, "ROWS": 16},
     {"do_ptr", "dd_ptr"}),
    (fused_norms._swiglu_fwd_kernel, {"HIDDEN": 4096, "BLOCK": 1024}, {"h_ptr", "out_ptr"}),
    (fused_norms._swiglu_bwd_kernel, {"HIDDEN": 1376, "BLOCK": 1024},
     {"h_ptr", "do_ptr", "dh_ptr"}),
    (rope._rope_kernel, {"HALF": 32, "HP": 32, "BT": 16, "INVERSE": False}, {"x_ptr", "out_ptr"}),
    (rope._rope_kernel, {"HALF": 24, "HP": 32, "BT": 16, "INVERSE": True}, set()),
    (attention_decode._split_kernel,  # bf16 cache, 4 query heads per KV head, split
     {"G": 4, "GB": 16, "D": 128, "BN": attention_decode.BLOCK_KEYS, "SPLITS": 32,
      "PRECISION": "tf32", "PDL": True}, {"q_ptr", "k_ptr", "v_ptr", "out_ptr"}),
    (attention_decode._split_kernel,  # float32, MHA, one split: writes the output
     {"G": 1, "GB": 16, "D": 64, "BN": attention_decode.BLOCK_KEYS, "SPLITS": 1,
      "PRECISION": "ieee", "PDL": False}, set()),
    (attention_decode._combine_kernel, {"SPLITS": 48, "SB": 64, "D": 128, "PDL": True},
     {"out_ptr"}),
    (attention_decode._append_kernel,
     {"H": 16, "KV": 4, "HB": 16, "KB": 4, "HALF": 64, "HP": 64, "ROPE": True, "PDL": True},
     {"q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr"}),
    (attention_decode._append_kernel,  # NoPE, head dim 96, float32
     {"H": 12, "KV": 12, "HB": 16, "KB": 16, "HALF": 48, "HP": 64, "ROPE": False, "PDL": False},
     set()),
    (mamba3_step_triton._mamba3_step_kernel,
     {"P": 64, "N": 128, "R": 4, "S_BLOCK": 32, "HALVES": True, "HEAVY_TAIL": True,
      "HAS_MIMO": True, "HAS_NORM": True, "PDL": True}, set()),
    (mamba3_step_triton._mamba3_step_kernel,  # bf16 activations and a bf16 SSM state
     {"P": 64, "N": 64, "R": 1, "S_BLOCK": 16, "HALVES": False, "HEAVY_TAIL": True,
      "HAS_MIMO": False, "HAS_NORM": False, "PDL": False},
     {"x_ptr", "z_ptr", "b_ptr", "c_ptr", "st_ssm_ptr", "st_k_ptr", "st_x_ptr", "out_ptr"}),
    (small_batch_linear._gemv_kernel,  # bf16, SwiGLU's product folded in
     {**GEMV, "ROWS": 1, "BN": 4, "GATED": True, "PDL": True, "PRELOAD": True}, GEMV_BF16),
    (small_batch_linear._gemv_kernel, {**GEMV, "ROWS": 2, "PDL": True}, GEMV_BF16),
    (small_batch_linear._gemv_kernel,
     {**GEMV, "ROWS": 2, "BN": 4, "BK": 64, "PRELOAD": True}, set()),
    (small_batch_linear._gemv_kernel,  # a block's norm and residual add folded in
     {**GEMV, "ROWS": 1, "BN": 4, "NORMED": True, "HAS_DELTA": True, "PDL": True,
      "PRELOAD": True}, GEMV_BF16 | {"d_ptr", "res_ptr", "nw_ptr"}),
    (small_batch_linear._gemv_kernel,  # the first block's norm: no residual add
     {**GEMV, "ROWS": 2, "NORMED": True, "PDL": True}, GEMV_BF16 | {"nw_ptr"}),
    (small_batch_linear._gemv_kernel,  # ... its rows gathered from the embedding table
     {**GEMV, "ROWS": 1, "BN": 4, "NORMED": True, "GATHER": True, "PDL": True, "PRELOAD": True},
     GEMV_BF16 | {"nw_ptr", "res_ptr"}),
]  # fmt: skip


def kernel_signature(fn, constexprs: dict, bf16: set[str]) -> dict[str, str]:
    """Triton's signature of `fn`: constexprs as given, pointers float32 unless named in
    `bf16` (or int), other arguments i32 or fp32 (also used by
    experiments/bench/kernel_resources.py)."""
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = (
                "*i32" if name in INT_POINTERS
                else "*i64" if name in INT64_POINTERS
                else "*i1" if name in INT8_POINTERS
                else "*bf16" if name in bf16
                else "*fp32"
            )  # fmt: skip
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return signature


@pytest.mark.parametrize(
    ("kernel", "constexprs", "bf16"), CASES, ids=lambda v: getattr(v, "__name__", None)
)
def test_kernel_compiles_for_sm90(kernel, constexprs, bf16):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = kernel_signature(fn, constexprs, bf16)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=LAUNCH_OPTIONS)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and ".target sm_90" in ptx
    # chained by PDL: a wait, then the signal; before the wait only weights may be loaded
    wait = ptx.find("griddepcontrol.wait")
    if not constexprs.get("PDL"):
        assert wait < 0 and "griddepcontrol" not in ptx
        return
    assert 0 <= wait < ptx.find("griddepcontrol.launch_dependents")
    preloads = constexprs.get("PRELOAD", fn.__name__ in LOADS_WEIGHTS_FIRST)
    assert (ptx.find("ld.global") < wait) == preloads
    # each load before the wait reads the weight, no other pointer
    names = [name for name, kind in signature.items() if kind != "constexpr"]
    early = {names[i] for loaded in ptx_load_params(ptx[:wait]) for i in loaded}
    assert {name for name in early if name.endswith("_ptr")} <= {"w_ptr"}, early


H100_SHARED_MEMORY = 232_448  # bytes a block may opt in to on sm_90 (227 KiB)
LARGEST = {"N": 256, "P": 256, "BT": 64, "BN": 64, "PRECISION": "tf32"}


@pytest.mark.parametrize(
    ("kernel", "constexprs"),
    [
        (mamba3_prefill_core._chunk_grad_kernel,
         {**LARGEST, "BN": mamba3_prefill_core.GRAD_BLOCK_N, "R": 8, "HAS_D": True}),
        (mamba3_prefill_core._chunk_output_kernel,
         {**LARGEST, **UNGATED, "R": 8, "BP": 64, "HAS_MX": True, "HAS_D": True}),
        (mamba3_prefill_core._state_pass_kernel,
         {"DX": 256, "DY": 256, "R": 8, "BT": 64, "BX": 64, "BY": 64, "HAS_INIT": True,
          "REVERSE": True, "HAS_MX": False, "SEGMENTED": True, "PRECISION": "tf32"}),
    ],
    ids=["grad", "output", "state_pass"],
)  # fmt: skip
@pytest.mark.parametrize("num_stages", [1, 3])
def test_largest_supported_shape_fits_h100_shared_memory(kernel, constexprs, num_stages):
    """headdim = d_state = 256 (the top of the supported range), R = 8, bf16: the chunk-gradient
    kernel needs ~120 KB (it holds (64, P) tiles of v, dy and the end-state product), within
    an H100's 227 KiB; GPUs with ~100 KB per block cannot run headdim 256."""
    fn = kernel.fn
    source = ASTSource(fn=fn, signature=kernel_signature(fn, constexprs, BF16_POINTERS),
                       constexprs=constexprs)  # fmt: skip
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={**LAUNCH_OPTIONS, "num_warps": 8, "num_stages": num_stages},
    )
    assert 0 < compiled.metadata.shared <= H100_SHARED_MEMORY
