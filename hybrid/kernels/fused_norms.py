"""Fused Triton RMSNorm, grouped gated RMSNorm (pre- and post-gate) and the SwiGLU product,
forward and backward.

One kernel serves every norm: rows of D channels in groups of GS (GS = D is a plain
RMSNorm), optionally gated by silu(z) after the norm (Mamba-3's pre-gate form) or before it
(Mamba-2's post-gate form). Statistics and arithmetic are float32 whatever the input dtype;
the backward recomputes 1/rms (nothing saved but the inputs) and writes the weight gradient
as per-block partial sums, summed by the caller.

The plain RMSNorm also takes the pre-norm residual add (`fused_add_rms_norm`): x + δ is formed,
stored and normalised in one pass, and the backward adds the residual stream's incoming
gradient to the norm's, so a block costs no separate add kernel in either direction (in
PyTorch: a mixed-dtype add forward and a gradient accumulation backward, ~25 µs each at
16,384 × 384 on an H100, two per block). Its backward also stores δ's gradient in δ's dtype
beside the stream's, and the normalised output may take another dtype than the stream (the
autocast dtype of the matmul it feeds): casts that would otherwise be kernels of their own,
one per block each way (~13 µs each at 16,384 × 384).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybrid.devices import multiprocessors, on_input_device
from hybrid.kernels.dependent_launch import chained, wait_for_predecessor
from hybrid.kernels.launch_args import pointer_or

ROWS_PER_PROGRAM = 16  # rows a norm program walks (its share of the weight-gradient sum)
# the walk is pipelined (the next rows' loads in flight while one is normalised): bf16,
# H100, forward+backward µs, 16,384 × 384 51.7 → 40.3, 49,152 × 512 123.8 → 114.7,
# 65,536 × 768 228.9 → 204.8 (torch's F.rms_norm: 84, 263, 413), forward 14.0 → 11.0 at
# 16,384 × 384, equal at the larger shapes
ROW_STAGES = tl.constexpr(3)
PROGRAMS_PER_SM = 2  # a forward over few rows walks fewer a program, to cover the SMs this often
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def forward_rows(rows: int, device: torch.device) -> int:
    """Rows a forward program walks: ROWS_PER_PROGRAM, fewer (a power of two) where that
    would leave the SMs short of PROGRAMS_PER_SM programs each. A batch-1 prefill's 512 rows
    had been 32 programs of 16 rows on 132 SMs, 5.4 us a norm on an H100."""
    wanted = triton.cdiv(rows, PROGRAMS_PER_SM * multiprocessors(device))
    return min(ROWS_PER_PROGRAM, triton.next_power_of_2(max(wanted, 1)))


@triton.jit
def _load_row(x_ptr, z_ptr, row, cols, mask, D, HAS_GATE: tl.constexpr):
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32) if HAS_GATE else x
    return x, z


@triton.jit
def _norm_fwd_kernel(
    x_ptr, d_ptr, res_ptr, z_ptr, w_ptr, out_ptr, M, D, eps,
    GS: tl.constexpr, BLOCK: tl.constexpr, HAS_GATE: tl.constexpr, BEFORE_GATE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """HAS_RESIDUAL: the input is x + δ (δ at d_ptr), stored at res_ptr in its dtype and
    normalised as stored. PDL: the weight is loaded before waiting for the kernel that wrote
    the rows."""
    rows0 = tl.program_id(0) * ROWS
    cols = tl.program_id(1) * GS + tl.arange(0, BLOCK)
    cmask = tl.arange(0, BLOCK) < GS
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
    wait_for_predecessor(PDL)
    # the program's rows that exist: a decode step's single row walks 1, not ROWS
    for i in tl.range(0, tl.minimum(ROWS, M - rows0), num_stages=ROW_STAGES):
        row = (rows0 + i).to(tl.int64)
        x, z = _load_row(x_ptr, z_ptr, row, cols, cmask, D, HAS_GATE)
        if HAS_RESIDUAL:
            x = x + tl.load(d_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
            x = x.to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * D + cols, x, mask=cmask)
            x = x.to(tl.float32)
        gate = z * tl.sigmoid(z) if HAS_GATE else 1.0
        u = x if BEFORE_GATE else x * gate
        rstd = tl.rsqrt(tl.sum(u * u, 0) / GS + eps)
        out = u * rstd * w
        if BEFORE_GATE:
            out = out * gate
        tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _norm_bwd_kernel(
    x_ptr, z_ptr, w_ptr, do_ptr, dres_ptr, dx_ptr, dd_ptr, dz_ptr, dw_ptr, M, D, eps,
    GS: tl.constexpr, BLOCK: tl.constexpr, HAS_GATE: tl.constexpr, BEFORE_GATE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DELTA_GRAD: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """HAS_RESIDUAL: x is the stored x + δ, and dres (the gradient the residual stream brings
    back to it) is added to dx, which is then both inputs' gradient; DELTA_GRAD: δ's copy of
    it goes to dd_ptr in δ's dtype."""
    blk = tl.program_id(0)
    cols = tl.program_id(1) * GS + tl.arange(0, BLOCK)
    cmask = tl.arange(0, BLOCK) < GS
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, tl.minimum(ROWS, M - blk * ROWS), num_stages=ROW_STAGES):
        row = (blk * ROWS + i).to(tl.int64)
        x, z = _load_row(x_ptr, z_ptr, row, cols, cmask, D, HAS_GATE)
        dout = tl.load(do_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        gate = z * sig if HAS_GATE else 1.0
        dgate_dz = sig + z * sig * (1.0 - sig)
        u = x if BEFORE_GATE else x * gate
        rstd = tl.rsqrt(tl.sum(u * u, 0) / GS + eps)
        uhat = u * rstd
        if BEFORE_GATE:
            dnormed = dout * gate
            if HAS_GATE:
                tl.store(dz_ptr + row * D + cols, dout * uhat * w * dgate_dz, mask=cmask)
        else:
            dnormed = dout
        dw += dnormed * uhat
        g = dnormed * w
        du = rstd * (g - uhat * (tl.sum(g * uhat, 0) / GS))
        if BEFORE_GATE:
            dx = du
        else:
            dx = du * gate
            if HAS_GATE:
                tl.store(dz_ptr + row * D + cols, du * x * dgate_dz, mask=cmask)
        if HAS_RESIDUAL:
            dx += tl.load(dres_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
        if DELTA_GRAD:
            tl.store(dd_ptr + row * D + cols, dx.to(dd_ptr.dtype.element_ty), mask=cmask)
    if HAS_WEIGHT:
        tl.store(dw_ptr + blk * D + cols, dw, mask=cmask)


class FusedNorm(torch.autograd.Function):
    """out = norm(x) (gated by z, optionally); with δ, (x + δ, norm(x + δ)). out takes
    out_dtype (None: that of x, or of x + δ)."""

    @staticmethod
    def forward(ctx, x, delta, z, weight, eps, group_size, before_gate, out_dtype):
        rows = x.numel() // x.shape[-1]
        dim = x.shape[-1]
        residual = delta is not None
        if residual:
            summed = torch.empty(x.shape, device=x.device,
                                 dtype=torch.promote_types(x.dtype, delta.dtype))  # fmt: skip
        else:
            summed = x
        out = torch.empty_like(summed, dtype=out_dtype or summed.dtype)
        walked = forward_rows(rows, x.device)
        grid = (triton.cdiv(rows, walked), dim // group_size)
        pdl = chained(x, rows)
        flags = {"HAS_GATE": z is not None, "BEFORE_GATE": before_gate,
                 "HAS_WEIGHT": weight is not None}  # fmt: skip
        _norm_fwd_kernel[grid](
            x, delta if residual else x, summed, pointer_or(z, x), pointer_or(weight, x), out,
            rows, dim, eps, GS=group_size, BLOCK=triton.next_power_of_2(group_size),
            HAS_RESIDUAL=residual, ROWS=walked, **flags, PDL=pdl, launch_pdl=pdl,
            enable_fp_fusion=True,
        )  # fmt: skip
        ctx.save_for_backward(summed, z, weight)
        ctx.set_materialize_grads(False)
        ctx.eps, ctx.group_size, ctx.flags = eps, group_size, flags
        ctx.input_dtypes = (x.dtype, delta.dtype) if residual else None
        return (summed, out) if residual else out

    @staticmethod
    def backward(ctx, *grads):
        x, z, weight = ctx.saved_tensors
        dres, dout = grads if ctx.input_dtypes else (None, grads[0])
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        blocks = triton.cdiv(rows, ROWS_PER_PROGRAM)
        dout = dout.contiguous() if dout is not None else torch.zeros_like(x)
        dx = torch.empty_like(x)
        # x + δ has the promoted dtype, so x's gradient is dx; δ's is stored beside it
        ddelta = dx
        if ctx.input_dtypes and ctx.input_dtypes[1] != dx.dtype:
            ddelta = torch.empty_like(x, dtype=ctx.input_dtypes[1])
        dz = torch.empty(z.shape, device=z.device, dtype=torch.float32) if z is not None else dx
        dw = torch.empty(blocks, dim, device=x.device, dtype=torch.float32)
        _norm_bwd_kernel[(blocks, dim // ctx.group_size)](
            x, pointer_or(z, x), pointer_or(weight, x), dout,
            dres.contiguous() if dres is not None else x, dx, ddelta, dz, dw, rows, dim, ctx.eps,
            GS=ctx.group_size, BLOCK=triton.next_power_of_2(ctx.group_size),
            HAS_RESIDUAL=dres is not None, DELTA_GRAD=ddelta is not dx, **ctx.flags,
            ROWS=ROWS_PER_PROGRAM, enable_fp_fusion=True,
        )  # fmt: skip
        dw = dw.sum(0).to(weight.dtype) if weight is not None else None
        dz = dz.to(z.dtype) if z is not None else None
        dinputs = (dx.to(ctx.input_dtypes[0]), ddelta) if ctx.input_dtypes else (dx, None)
        return (*dinputs, dz, dw, None, None, None, None)


def takes(x: Tensor) -> bool:
    """Whether the fused kernels apply: CUDA, a float dtype they compile for."""
    return x.is_cuda and x.dtype in KERNEL_DTYPES


@on_input_device
def fused_gated_rms_norm(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """RMSNorm over groups of the last dim, optionally gated by silu(z) (pre- or post-norm),
    in out_dtype (None: x's)."""
    return FusedNorm.apply(
        x.contiguous(), None, z.contiguous() if z is not None else None, weight, eps,
        group_size, norm_before_gate, out_dtype,
    )  # fmt: skip


@on_input_device
def fused_add_rms_norm(
    x: Tensor,
    delta: Tensor,
    weight: Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(x + δ, RMSNorm(x + δ)) over the last dim: the sum in the promoted dtype of x and δ,
    the norm in out_dtype (None: the sum's)."""
    return FusedNorm.apply(
        x.contiguous(), delta.contiguous(), None, weight, eps, x.shape[-1], True, out_dtype
    )


@triton.jit
def _halves(h_ptr, offs, mask, HIDDEN: tl.constexpr):
    """Element offs of the (rows, hidden) product reads gate and up from one row of the
    fused (rows, 2·hidden) projection."""
    at = (offs // HIDDEN) * (2 * HIDDEN) + offs % HIDDEN
    a = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + at + HIDDEN, mask=mask, other=0.0).to(tl.float32)
    return a, b, at


@triton.jit
def _swiglu_fwd_kernel(h_ptr, out_ptr, n, HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a, b, _ = _halves(h_ptr, offs, mask, HIDDEN)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, do_ptr, dh_ptr, n, HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a, b, at = _halves(h_ptr, offs, mask, HIDDEN)
    dout = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + at, (dout * b * (sig + a * sig * (1.0 - sig))).to(ty), mask=mask)
    tl.store(dh_ptr + at + HIDDEN, (dout * a * sig).to(ty), mask=mask)


class SwiGLUProduct(torch.autograd.Function):
    """silu(gate) ⊙ up from the fused projection [gate | up], one pass each way."""

    @staticmethod
    def forward(ctx, h):
        hidden = h.shape[-1] // 2
        out = torch.empty(*h.shape[:-1], hidden, device=h.device, dtype=h.dtype)
        n = out.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, 1024),)](
            h, out, n, HIDDEN=hidden, BLOCK=1024, enable_fp_fusion=True
        )
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        dh = torch.empty_like(h)
        n = dout.numel()
        grid = (triton.cdiv(n, 1024),)
        _swiglu_bwd_kernel[grid](
            h, dout.contiguous(), dh, n, HIDDEN=h.shape[-1] // 2, BLOCK=1024, enable_fp_fusion=True
        )
        return dh


@on_input_device
def fused_swiglu(h: Tensor) -> Tensor:
    """silu(h[..., :hidden]) ⊙ h[..., hidden:] for the fused (..., 2·hidden) projection."""
    return SwiGLUProduct.apply(h.contiguous())
