"""Registers, stack (spill) bytes and shared memory of the Mamba-3 scan's training kernels for
an H100 (sm_90), compiled offline: no GPU needed. Each kernel is compiled as its launch would
compile it (16-byte-aligned pointers and token strides divisible by 16, which Triton's JIT
specialises on; bf16 activations; the launch's tiling, and every autotune candidate for the
autotuned scan kernels) and the bundled cuobjdump reads the cubin. Register pressure is what
the backward kernels' speed followed (the chunk-gradient kernel at 255 registers with spills
was 15% slower than without, BENCHMARKS.md), so a change can be screened here before GPU time
is spent on it. The figures depend on the Triton version (its code generation and ptxas):
the GPU host's is the one that counts, and the table names the one used. Checked against
`ncu` on an H100 with Triton 3.6: chunk output 108 registers, state pass 110-120, the old
chunk gradient 255 registers and 112 KB of shared memory, as here.

    python experiments/bench/kernel_resources.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_kernels_compile import LAUNCH_OPTIONS, kernel_signature

from hybrid.kernels import mamba3_gate, mamba3_prefill_core, mimo_values, rotated_bc

# every pointer these kernels take in the activations' dtype (the rest are float32)
ACTIVATIONS = {"q_ptr", "k_ptr", "v_ptr", "dy_ptr", "x_ptr", "y_ptr", "dq_ptr", "dk_ptr",
               "dv_ptr", "states_ptr", "dstates_ptr", "b_ptr", "c_ptr", "db_ptr", "dc_ptr",
               "z_ptr", "dz_ptr", "out_ptr", "do_ptr", "dxr_ptr", "dx_ptr"}  # fmt: skip
REGISTERS_PER_SM, SHARED_PER_SM, MAX_CTAS_PER_SM, MAX_WARPS_PER_SM = 65536, 233472, 32, 64
N, P, CHUNK_ROWS, HEADS = 128, 64, 64, 12  # the paper's state, a 21M hybrid's 12 heads
SEQUENCES = 32  # the 21M hybrid's training batch: its (sequence, head) pairs set the state tiles


def _cases(rank: int) -> list[tuple[str, object, dict, list[tuple[int, int]]]]:
    """(label, kernel, constexprs, [(warps, stages)]) at rank `rank`."""
    core = mamba3_prefill_core
    tuned = [(c.num_warps, c.num_stages) for c in core.CANDIDATE_CONFIGS]
    scan = {"N": N, "P": P, "R": rank, "BT": CHUNK_ROWS, "PRECISION": "tf32"}
    columns = min(N, core.state_pass_columns(SEQUENCES * HEADS))
    state = {"DX": P, "DY": N, "R": rank, "BT": CHUNK_ROWS, "BX": 64, "BY": columns,
             "HAS_INIT": False, "SEGMENTED": False, "PRECISION": "tf32"}  # fmt: skip
    rb_bt, rb_warps, rb_stages = rotated_bc.backward_tiling(rank, N)
    rf_bt, rf_warps, rf_stages = rotated_bc.FORWARD_TILING
    gate_bt, gate_warps = mamba3_gate.backward_tiling(rank)
    gate = {"R": rank, "P": P, "HAS_MIMO": rank > 1, "HAS_NORM": False}
    cases = [
        ("state pass", core._state_pass_kernel,
         {**state, "REVERSE": False, "HAS_MX": rank > 1}, tuned),
        ("state pass, reverse", core._state_pass_kernel,
         {**state, "REVERSE": True, "HAS_MX": False}, tuned),
        ("chunk output", core._chunk_output_kernel,
         {**scan, "BN": N if rank > 1 else 64, "BP": P, "HAS_MX": rank > 1, "HAS_D": True,
          "GATE": False, "GATE_MIMO": False, "HAS_NORM": False},
         tuned),
        ("chunk gradient", core._chunk_grad_kernel,
         {**scan, "BN": core.GRAD_BLOCK_N, "HAS_D": True}, tuned),
        ("B/C rotation", rotated_bc._rotated_bc_fwd_kernel,
         {"N": N, "R": rank, "BT": rf_bt, "HB": HEADS, "PAIRWISE": rank == 1,
          "STAGES": rf_stages}, [(rf_warps, 1)]),
        ("B/C rotation backward", rotated_bc._rotated_bc_bwd_kernel,
         {"N": N, "R": rank, "BT": rb_bt, "HB": HEADS, "PAIRWISE": rank == 1,
          "STAGES": rb_stages}, [(rb_warps, 1)]),
        ("gate", mamba3_gate._gate_fwd_kernel, {**gate, "BT": mamba3_gate.BLOCK_TOKENS},
         [(4, 1)]),
        ("gate backward", mamba3_gate._gate_bwd_kernel,
         {**gate, "BT": gate_bt, "ROLLED": rank > mamba3_gate.MAX_UNROLLED_RANK},
         [(gate_warps, 1)]),
    ]  # fmt: skip
    if rank > 1:
        cases.append(("MIMO values backward", mimo_values._values_bwd_kernel,
                      {"R": rank, "P": P, "BT": mimo_values.BLOCK_TOKENS}, [(4, 1)]))  # fmt: skip
    return cases


def _resources(kernel, constexprs: dict, warps: int, stages: int) -> dict[str, int]:
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = kernel_signature(fn, constexprs, ACTIVATIONS)
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(signature.items())
        if kind.startswith("*") or (kind == "i32" and name.startswith("S"))
    }
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
        target=GPUTarget("cuda", 90, 32),
        options={**LAUNCH_OPTIONS, "num_warps": warps, "num_stages": stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    fields = dict(item.split(":") for item in usage.split("\n Function")[-1].split()[1:])
    registers, shared = int(fields["REG"]), compiled.metadata.shared
    warp_registers = -(-registers * 32 // 256) * 256  # allocated per warp in 256s
    ctas = min(
        MAX_CTAS_PER_SM,
        MAX_WARPS_PER_SM // warps,
        REGISTERS_PER_SM // (warp_registers * warps),
        SHARED_PER_SM // (shared + 1024) if shared else MAX_CTAS_PER_SM,
    )
    return {"registers": registers, "stack_bytes": int(fields["STACK"]),
            "shared_kb": shared // 1024, "ctas_per_sm": ctas}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,4", help="comma-separated MIMO ranks (1: SISO)")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    args = parser.parse_args(argv)
    print(f"Triton {triton.__version__}, sm_90; N={N}, P={P}, {CHUNK_ROWS} score rows a chunk")
    print(f"{'kernel':<24}{'R':>3}{'warps':>6}{'stages':>7}{'registers':>10}{'stack B':>9}"
          f"{'shared KB':>10}{'CTAs/SM':>8}")  # fmt: skip
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        for label, kernel, constexprs, launches in _cases(rank):
            for warps, stages in launches:
                row = {"kernel": label, "rank": rank, "warps": warps, "stages": stages,
                       **_resources(kernel, constexprs, warps, stages)}  # fmt: skip
                rows.append(row)
                print(f"{label:<24}{rank:>3}{warps:>6}{stages:>7}{row['registers']:>10}"
                      f"{row['stack_bytes']:>9}{row['shared_kb']:>10}{row['ctas_per_sm']:>8}",
                      flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
