"""Mamba-3 mixer (arXiv 2603.15569): SISO and MIMO, optional pre-gate grouped RMSNorm.

Parameter names and the in_proj split follow mamba_ssm's `Mamba3` module, so state dicts
line up: in_proj -> [z | x | B (R·G·N) | C (R·G·N) | dd_dt (H) | dd_A (H) | trap (H) |
angle (S)], then the core op (hybrid.kernels.mamba3_scan / mamba3_step), then out_proj.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hybrid.devices import autocast_dtype
from hybrid.errors import invalid
from hybrid.kernels import mamba3_scan, mamba3_step
from hybrid.kernels.mamba3_common import (
    A_ACTIVATIONS,
    Mamba3Inputs,
    Mamba3Options,
    Mamba3State,
    Mamba3Weights,
    n_rope_angles,
)
from hybrid.kernels.mamba3_decode import DECODE_BACKENDS
from hybrid.kernels.mamba3_scan import SCAN_BACKENDS
from hybrid.kernels.projection_grads import ProjectionGrads, split_projection
from hybrid.kernels.small_batch_linear import small_batch_linear
from hybrid.layers.linear import Linear
from hybrid.layers.norms import GroupedGatedRMSNorm, RMSNorm
from hybrid.layers.registry import Layer, register

ROPE_FRACTIONS = (0.5, 1.0)
# in_proj's output rows are padded to a multiple of this many columns at matmul time: cuBLAS
# runs its Hopper kernels only on 16-byte-aligned rows, and an unaligned width (3H + S is
# often odd) falls back to an sm80 kernel at 40% of their speed (H100, BENCHMARKS.md)
PROJECTION_ALIGNMENT = 8
STATE_DTYPES = ("float32", "bfloat16")


class PaddedWeight(torch.autograd.Function):
    """weight with `extra` zero rows appended, in `dtype`, and its gradient back: one
    cast-copy kernel each way (and a fill of the few padding rows). `F.pad` of the float32
    weight followed by autocast's cast took a padded float32 copy, its cast and, backward, a
    cast and a slice copy (H100, graphed training: BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, weight: Tensor, extra: int, dtype: torch.dtype) -> Tensor:
        rows = weight.shape[0]
        padded = weight.new_empty(rows + extra, *weight.shape[1:], dtype=dtype)
        padded[rows:].zero_()
        padded[:rows].copy_(weight)
        ctx.rows, ctx.weight_dtype = rows, weight.dtype
        return padded

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad[: ctx.rows].to(ctx.weight_dtype), None, None


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class Mamba3Config:
    """Defaults are the paper's (expand 2, N 128, P 64), SISO, no pre-gate norm.

    mimo_rank 1 is SISO (pairwise rotation); >1 is MIMO (rotation over halves), as in the
    published kernels. pregate_norm adds the per-head RMSNorm before the silu(z) gate that
    the paper's hybrids use. a_activation "heavy_tail" is mamba_ssm HEAD, "softplus" the
    2.3.2 release. state_dtype "bfloat16" halves the decode cache's SSM state (and the bytes
    a decode step moves); arithmetic stays float32. chunk_size counts score rows per chunk
    (tokens x mimo_rank): MIMO chunks hold chunk_size / R tokens, as the paper's MIMO
    kernels do. backend "auto" runs the Triton scan on CUDA where it applies, "chunked"
    forces PyTorch, "triton" forces Triton. decode_backend picks the one-token step's kernel
    (hybrid.kernels.mamba3_decode.DECODE_BACKENDS): "auto" is CuTe, then Triton, then PyTorch.
    """

    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    ngroups: int = 1
    mimo_rank: int = 1
    rope_fraction: float = 0.5
    chunk_size: int = 64
    pregate_norm: bool = False
    a_activation: str = "heavy_tail"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_floor: float = 1e-4
    backend: str = "auto"
    decode_backend: str = "auto"
    state_dtype: str = "float32"

    @property
    def chunk_tokens(self) -> int:
        """Tokens per scan chunk: chunk_size score rows shared by the R ranks of each token."""
        return max(1, self.chunk_size // self.mimo_rank)

    def validate(self, d_model: int) -> None:
        if not _is_positive_int(self.d_state) or self.d_state % 2:
            raise invalid("mamba3.d_state", self.d_state, "a positive even integer")
        if not _is_positive_int(self.expand):
            raise invalid("mamba3.expand", self.expand, "a positive integer")
        d_inner = self.expand * d_model
        if not _is_positive_int(self.headdim) or d_inner % self.headdim:
            raise invalid(
                "mamba3.headdim",
                self.headdim,
                f"a divisor of d_inner = expand * d_model = {d_inner}",
            )
        n_heads = d_inner // self.headdim
        if not _is_positive_int(self.ngroups) or n_heads % self.ngroups:
            raise invalid("mamba3.ngroups", self.ngroups, f"a divisor of n_heads = {n_heads}")
        if not _is_positive_int(self.mimo_rank):
            raise invalid("mamba3.mimo_rank", self.mimo_rank, "an integer >= 1 (1 is SISO)")
        if self.rope_fraction not in ROPE_FRACTIONS:
            raise invalid("mamba3.rope_fraction", self.rope_fraction, str(ROPE_FRACTIONS))
        if n_rope_angles(self.d_state, self.rope_fraction) < 1:  # the RoPE part would be gone
            smallest = math.ceil(2 / self.rope_fraction)
            raise invalid(
                "mamba3.d_state",
                self.d_state,
                f"an even integer >= {smallest} at rope_fraction={self.rope_fraction} (one "
                "rotary angle at least)",
            )
        if not _is_positive_int(self.chunk_size):
            raise invalid("mamba3.chunk_size", self.chunk_size, "a positive integer")
        if self.a_activation not in A_ACTIVATIONS:
            raise invalid("mamba3.a_activation", self.a_activation, str(A_ACTIVATIONS))
        if not self.dt_max > 0:
            raise invalid("mamba3.dt_max", self.dt_max, "a positive number")
        if not 0 < self.dt_min <= self.dt_max:
            raise invalid("mamba3.dt_min", self.dt_min, f"0 < dt_min <= dt_max={self.dt_max}")
        for name in ("dt_init_floor", "a_floor"):
            if not getattr(self, name) > 0:
                raise invalid(f"mamba3.{name}", getattr(self, name), "a positive number")
        if self.backend not in SCAN_BACKENDS:
            raise invalid("mamba3.backend", self.backend, str(SCAN_BACKENDS))
        if self.decode_backend not in DECODE_BACKENDS:
            raise invalid("mamba3.decode_backend", self.decode_backend, str(DECODE_BACKENDS))
        if self.state_dtype not in STATE_DTYPES:
            raise invalid("mamba3.state_dtype", self.state_dtype, str(STATE_DTYPES))

    def cache_dtype(self, activation: torch.dtype) -> torch.dtype:
        """The decode cache's SSM-state dtype: bfloat16 if asked, else at least float32 and
        at least the activations' precision."""
        if self.state_dtype == "bfloat16":
            return torch.bfloat16
        return torch.promote_types(activation, torch.float32)


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


@register("mamba3", symbol="M", config=Mamba3Config)
class Mamba3(Layer):
    is_mixer = True

    def __init__(self, d_model: int, config: Mamba3Config, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.d_inner = config.expand * d_model
        self.n_heads = self.d_inner // config.headdim
        self.rank = config.mimo_rank
        self.n_angles = n_rope_angles(config.d_state, config.rope_fraction)
        bc = self.rank * config.ngroups * config.d_state
        h = self.n_heads
        # in_proj's pieces in mamba_ssm's order, named as the Mamba3Inputs fields
        self._split = {"z": self.d_inner, "x": self.d_inner, "b": bc, "c": bc, "dt": h, "a": h,
                       "trap": h, "angle": self.n_angles}  # fmt: skip
        self.in_proj = Linear(d_model, sum(self._split.values()), **factory)
        self._padding = -sum(self._split.values()) % PROJECTION_ALIGNMENT
        self.out_proj = Linear(self.d_inner, d_model, **factory)
        self.out_proj.is_residual_out = True

        h, r, n, p = self.n_heads, self.rank, config.d_state, config.headdim
        self.dt_bias = nn.Parameter(torch.empty(h, **factory))
        self.B_norm = RMSNorm(n, **factory)
        self.C_norm = RMSNorm(n, **factory)
        self.B_bias = nn.Parameter(torch.empty(h, r, n, **factory))
        self.C_bias = nn.Parameter(torch.empty(h, r, n, **factory))
        self.D = nn.Parameter(torch.empty(h, **factory))
        self.dt_bias._no_weight_decay = True
        self.D._no_weight_decay = True
        if r > 1:
            self.mimo_x = nn.Parameter(torch.empty(h, r, p, **factory))
            self.mimo_z = nn.Parameter(torch.empty(h, r, p, **factory))
            self.mimo_o = nn.Parameter(torch.empty(h, r, p, **factory))
        self.norm = (
            GroupedGatedRMSNorm(self.d_inner, group_size=p, **factory)
            if config.pregate_norm
            else None
        )
        self.options = Mamba3Options(
            rotation="pairwise" if r == 1 else "halves",
            a_activation=config.a_activation,
            a_floor=config.a_floor,
        )
        self.reset_mamba3_parameters()

    @torch.no_grad()
    def reset_mamba3_parameters(self) -> None:
        """MAMBA3.md §2: dt_bias = softplus⁻¹(log-uniform Δ in [dt_min, dt_max]), B/C biases,
        norms and D ones, MIMO x/o projections 1/R and z projection ones."""
        cfg = self.config
        if self.dt_bias.device.type == "meta":
            return
        log_dt = torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(
            math.log(cfg.dt_min), math.log(cfg.dt_max)
        )
        dt = log_dt.exp().clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(_inverse_softplus(dt))
        for ones in (self.B_bias, self.C_bias, self.D):
            ones.fill_(1.0)
        if self.rank > 1:
            self.mimo_x.fill_(1.0 / self.rank)
            self.mimo_z.fill_(1.0)
            self.mimo_o.fill_(1.0 / self.rank)

    def weights(self) -> Mamba3Weights:
        mimo = self.rank > 1
        return Mamba3Weights(
            dt_bias=self.dt_bias,
            b_norm=self.B_norm.weight,
            c_norm=self.C_norm.weight,
            b_bias=self.B_bias,
            c_bias=self.C_bias,
            d=self.D,
            mimo_x=self.mimo_x if mimo else None,
            mimo_z=self.mimo_z if mimo else None,
            mimo_o=self.mimo_o if mimo else None,
            out_norm=self.norm.weight.view(self.n_heads, -1) if self.norm is not None else None,
        )

    def project(self, x: Tensor) -> tuple[Mamba3Inputs, ProjectionGrads | None]:
        """in_proj and split for sequences (a decode step's matmul is a matrix-vector product
        that a copy of the weight would only slow down: `step_projected` splits in_proj's
        plain output): the weight is padded with zero rows for the matmul
        (`PROJECTION_ALIGNMENT`), the parameter keeps mamba_ssm's shape, and the split's
        views skip the padding columns. Also returns the split's gradient buffer, which the
        Triton backward kernels write into (`split_projection`; None without autograd)."""
        padding = self._padding
        weight = self.in_proj.weight
        if padding:
            dtype = autocast_dtype(weight) or weight.dtype
            weight = PaddedWeight.apply(weight, padding, dtype)
        return self._split_inputs(small_batch_linear(x, weight), padding)

    def _split_inputs(
        self, projected: Tensor, padding: int = 0
    ) -> tuple[Mamba3Inputs, ProjectionGrads | None]:
        """`project`'s split of the in_proj output into the named inputs."""
        pieces, grads = split_projection(projected, {**self._split, "padding": padding})
        heads = (self.n_heads, self.config.headdim)
        bc = (self.rank, self.config.ngroups, self.config.d_state)
        shapes = {"z": heads, "x": heads, "b": bc, "c": bc}
        inputs = Mamba3Inputs(
            **{
                name: piece.unflatten(-1, shapes[name]) if name in shapes else piece
                for name, piece in pieces.items()
                if name != "padding"
            }
        )
        return inputs, grads

    def allocate_cache(self, batch, max_seqlen, *, device, dtype) -> Mamba3State:
        return Mamba3State.zeros(
            batch,
            self.n_heads,
            self.config.headdim,
            self.config.d_state,
            self.n_angles,
            self.rank,
            dtype=dtype,
            state_dtype=self.config.cache_dtype(dtype),
            device=device,
        )

    def forward(self, x: Tensor, cache: Mamba3State | None = None) -> Tensor:
        inputs, grads = self.project(x)
        out, _ = mamba3_scan(
            inputs,
            self.weights(),
            self.options,
            state=cache,
            chunk_size=self.config.chunk_tokens,
            backend=self.config.backend,
            final_state=cache is not None,
            grads=grads,
            update_state=cache is not None,
        )
        return self.out_proj(out.flatten(-2))

    def step_projection(self) -> Linear:
        return self.in_proj

    def step_projected(self, projected: Tensor, cache: Mamba3State) -> Tensor:
        inputs, _ = self._split_inputs(projected)
        # in_proj ran just before: it does not write the state (the kernel may load it early)
        out = mamba3_step(inputs, self.weights(), self.options, cache, self.config.decode_backend,
                          state_settled=True)  # fmt: skip
        return self.out_proj(out.flatten(-2))

    def flops_per_token(self, seq_len: int) -> int:
        """Matmul FLOPs of the projections and the chunked scan (causal half of each chunk)."""
        h, r, n, p = self.n_heads, self.rank, self.config.d_state, self.config.headdim
        d_model = self.in_proj.in_features
        projections = 2 * d_model * (self.in_proj.out_features + self.d_inner)
        within_chunk = (min(self.config.chunk_tokens, seq_len) + 1) / 2
        intra = 2 * within_chunk * r * r * h * (n + p)
        state = 2 * 2 * r * h * p * n  # read out of the state + chunk state update
        return int(projections + intra + state)

    def state_bytes(self, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """SSM state in `state_dtype`, angles and the last token's γ in fp32 (at least),
        last k and x in the activation dtype."""
        h, r, n, p = self.n_heads, self.rank, self.config.d_state, self.config.headdim
        state_dtype = self.config.cache_dtype(dtype)
        angle_dtype = torch.promote_types(state_dtype, torch.float32)
        return (
            state_dtype.itemsize * h * p * n
            + angle_dtype.itemsize * h * (self.n_angles + 1)
            + dtype.itemsize * (r * h * n + h * p)
        )
