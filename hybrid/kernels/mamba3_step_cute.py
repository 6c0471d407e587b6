"""The one-token Mamba-3 update as a CuTe DSL kernel (hybrid/kernels/mamba3_step_cute_kernel.py),
with the contract of `mamba3_step_triton`: same inputs, state updated in place, o returned.

`nvidia-cutlass-dsl` is optional: nothing here imports it until a kernel is compiled, and
`cute_available()` tells the dispatch whether it can. Compiled kernels are cached per
(shapes, dtypes, options, state alignment); the batch size is a runtime argument, so a new
batch does not recompile. Launches go to the current CUDA stream (CUDA-graph capturable).
Each eager call builds 24 raw pointers on the host (tens of microseconds); decoding is timed
and served through CUDA graphs, which replay without that cost.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from hybrid.devices import multiprocessors
from hybrid.kernels.dependent_launch import chained
from hybrid.kernels.launch_args import token_major
from hybrid.kernels.mamba3_common import (
    Mamba3Inputs,
    Mamba3Options,
    Mamba3State,
    Mamba3Weights,
)

CUTE_DTYPES = {torch.float32: "Float32", torch.bfloat16: "BFloat16", torch.float16: "Float16"}
STATE_DTYPES = (torch.float32, torch.bfloat16)
MAX_RANK = 8
SMEM_LIMIT = 48 * 1024  # static shared memory, no opt-in needed


@functools.cache
def cute_available() -> bool:
    """Whether `cutlass` (nvidia-cutlass-dsl) imports; asked once per process (an eager
    decode step asks on every call, and a failing import searches sys.path each time)."""
    try:
        importlib.import_module("cutlass")
    except ImportError:
        return False
    return True


def shared_bytes(headdim: int, d_state: int, rank: int, angles: int) -> int:
    """Shared memory of one CTA: rotated k, q and cached k (R·N each), the row coefficients
    and y (R·P each), the k·q products (R·R), x and z (P each), the angles' cos and sin and
    the norm's partial sums (each buffer 16-byte aligned); k/q rows may carry N/8 floats of
    padding."""
    row = d_state + d_state // 8 if d_state % 32 == 0 else d_state
    floats = 3 * rank * row + (2 * rank + 2) * headdim + rank * rank + 2 * max(angles, 1)
    floats += 8 * rank
    return 4 * floats + 9 * 16


def shape_reason(headdim: int, d_state: int, rank: int, angles: int) -> str | None:
    """Why the kernel cannot take these sizes (before looking at tensors), or None."""
    if d_state % 2 or not 1 <= rank <= MAX_RANK:
        return f"needs an even d_state and rank 1..{MAX_RANK}"
    if shared_bytes(headdim, d_state, rank, angles) > SMEM_LIMIT:
        return f"headdim {headdim}, d_state {d_state}, rank {rank} exceed {SMEM_LIMIT} B smem"
    return None


def unsupported_reason(token: Mamba3Inputs, state: Mamba3State) -> str | None:
    """Why the CuTe kernel cannot take these inputs, or None when it can."""
    batch, n_heads, headdim = token.x.shape
    rank, n_groups, d_state = token.b.shape[1], token.b.shape[2], token.b.shape[3]
    n_angles = token.angle.shape[-1]
    tensors = (*token, *state.tensors())
    if not all(t.is_cuda for t in tensors):
        return "needs CUDA tensors"
    if torch.cuda.get_device_capability(state.ssm.device) < (8, 0):
        return "needs compute capability 8.0 or newer"
    if any(t.requires_grad for t in tensors):
        return "does not differentiate (autograd inputs)"
    if any(t.dtype not in CUTE_DTYPES for t in (*token, state.k, state.x)):
        return f"token and cache dtypes must be among {list(CUTE_DTYPES)}"
    float32_parts = (state.angle.dtype, state.gamma.dtype) == (torch.float32, torch.float32)
    if state.ssm.dtype not in STATE_DTYPES or not float32_parts:
        return "state must be float32 or bfloat16 with float32 angles and γ"
    if not all(t.is_contiguous() for t in state.tensors()):
        return "state tensors must be contiguous"
    if n_heads % n_groups:
        return "heads must be divisible by groups"
    if 2 * n_angles > d_state:
        return "more rotary angles than d_state/2"
    if (reason := shape_reason(headdim, d_state, rank, n_angles)) is not None:
        return reason
    if batch > 65535:
        return "batch above the grid's y limit (65535)"
    if batch * max(max(t.stride(0), t.shape[1:].numel()) for t in token) >= 2**31:
        return "token inputs beyond 32-bit element offsets"
    return None


def supports(token: Mamba3Inputs, state: Mamba3State) -> bool:
    return unsupported_reason(token, state) is None


def _alignment(t: Tensor) -> int:
    address = t.data_ptr()
    return min(16, address & -address) if address else 16


def _launch_tensors(token: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State, out: Tensor):
    """The kernel's 24 pointer arguments in order (absent weights: d, never read)."""
    optional = (weights.mimo_x, weights.mimo_z, weights.mimo_o, weights.out_norm)
    fixed = [w.contiguous() for w in weights[:6]]
    return (
        *token,
        *fixed,
        *(fixed[5] if w is None else w.contiguous() for w in optional),
        *state.tensors(),
        out,
    )


def step_config(
    token: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State,
    tensors: tuple[Tensor, ...],
    state_settled: bool = False,
):
    """The compile key of a call (see mamba3_step_cute_kernel.StepConfig)."""
    from hybrid.kernels.mamba3_step_cute_kernel import StepConfig

    _, n_heads, headdim = token.x.shape
    is_chained = chained(state.ssm, token.x.shape[0])
    return StepConfig(
        heads=n_heads,
        headdim=headdim,
        d_state=token.b.shape[3],
        rank=token.b.shape[1],
        groups=token.b.shape[2],
        angles=token.angle.shape[-1],
        halves=options.rotation == "halves",
        heavy_tail=options.a_activation == "heavy_tail",
        mimo=weights.mimo_x is not None,
        norm=weights.out_norm is not None,
        a_floor=options.a_floor,
        bc_eps=options.bc_norm_eps,
        out_eps=options.out_norm_eps,
        dtypes=tuple(CUTE_DTYPES[t.dtype] for t in tensors),
        ssm_bytes=state.ssm.element_size(),
        ssm_align=_alignment(state.ssm),
        token_strides=tuple(t.stride(0) for t in token),
        chained=is_chained,
        early_state=is_chained and state_settled,
        many_ctas=_more_ctas_than_sms(state.ssm, token.x.shape[0] * n_heads),
    )


def _more_ctas_than_sms(t: Tensor, ctas: int) -> bool:
    """Whether a grid of `ctas` CTAs on t's device outnumbers its SMs (assumed off CUDA: the
    offline compiles of the CPU tests)."""
    return not t.is_cuda or ctas > multiprocessors(t.device)


@functools.cache
def compiled_step(cfg, arch: str | None = None):
    """cute.compile the kernel for `cfg` (once per process); `arch` ("sm_90a") compiles for
    a GPU that is not present, as the CPU tests do."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    from hybrid.kernels.mamba3_step_cute_kernel import Mamba3StepKernel

    ptrs = [
        make_ptr(getattr(cutlass, name), 16 * 1024, cute.AddressSpace.gmem, assumed_align=align)
        for name, align in zip(cfg.dtypes, _alignments(cfg), strict=True)
    ]
    options = f"--gpu-arch {arch}" if arch else None
    kernel = Mamba3StepKernel(cfg, offline=arch is not None)
    args = (*ptrs, cutlass.Int32(1), cuda.CUstream(0))
    return cute.compile(kernel, *args, options=options) if options else cute.compile(kernel, *args)


def _alignments(cfg) -> list[int]:
    """Assumed pointer alignment per argument: the element size, and the state's own."""
    sizes = {"Float32": 4, "BFloat16": 2, "Float16": 2}
    aligns = [sizes[name] for name in cfg.dtypes]
    aligns[19] = cfg.ssm_align  # state.ssm
    return aligns


def mamba3_step_cute(
    token: Mamba3Inputs,
    weights: Mamba3Weights,
    options: Mamba3Options,
    state: Mamba3State,
    state_settled: bool = False,
) -> Tensor:
    """Advance `state` in place by one token; returns o (Bt, H, P) in x's dtype.
    `state_settled`: the kernel launched just before this one does not write `state` (see
    `mamba3_decode.mamba3_step`)."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    token = Mamba3Inputs(*(token_major(t) for t in token))  # in_proj slices: no copy
    out = torch.empty(token.x.shape, dtype=token.x.dtype, device=token.x.device)  # dense
    tensors = _launch_tensors(token, weights, state, out)
    cfg = step_config(token, weights, options, state, tensors, state_settled)
    kernel = compiled_step(cfg)
    ptrs = [
        make_ptr(getattr(cutlass, name), t.data_ptr(), cute.AddressSpace.gmem, assumed_align=al)
        for t, name, al in zip(tensors, cfg.dtypes, _alignments(cfg), strict=True)
    ]
    stream = cuda.CUstream(torch.cuda.current_stream(state.ssm.device).cuda_stream)
    kernel(*ptrs, cutlass.Int32(token.x.shape[0]), stream)
    return out
