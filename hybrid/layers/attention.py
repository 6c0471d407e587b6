"""Causal multi-head attention with grouped KV heads, RoPE or NoPE, and a static KV cache.

Prefill backends, first that applies: flash-attn-4 (CuTe DSL; Hopper and Blackwell,
fp16/bf16), flash-attn 2 (Ampere and newer, fp16/bf16), torch `scaled_dot_product_attention`
(anything else, and every prefill that continues a non-empty KV cache). Decode steps (one token
against the cache) read their positions from the cache's device tensor `seqlens`, so a CUDA
graph of a step serves every position: on CUDA a Triton split-KV kernel
(`hybrid.kernels.attention_decode`), else flash-attn-4's `flash_attn_varlen_func` with
`seqused_k` where the prefill runs flash-attn-4, else SDPA over the whole cache with a length
mask. Each choice and its reason are logged once per (backend, reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from inspect import signature

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid.cache import KVCache
from hybrid.devices import on_device, on_input_device
from hybrid.errors import invalid
from hybrid.layers.linear import Linear
from hybrid.layers.registry import Layer, register

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "fa4", "fa2", "sdpa")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionConfig:
    """n_kv_heads None means n_heads (plain MHA); head_dim None means d_model // n_heads;
    rope False is NoPE (the paper's hybrids use NoPE attention)."""

    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope: bool = True
    rope_theta: float = 10000.0
    backend: str = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def head_size(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    def validate(self, d_model: int) -> None:
        if not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise invalid("attention.n_heads", self.n_heads, "a positive integer")
        kv = self.kv_heads
        if not isinstance(kv, int) or kv < 1 or self.n_heads % kv:
            raise invalid(
                "attention.n_kv_heads",
                self.n_kv_heads,
                f"a positive divisor of attention.n_heads={self.n_heads}",
            )
        if self.head_dim is None and d_model % self.n_heads:
            raise invalid(
                "attention.n_heads",
                self.n_heads,
                f"a divisor of d_model={d_model}, or set attention.head_dim",
            )
        head_dim = self.head_size(d_model)
        if not isinstance(head_dim, int) or head_dim < 1 or (self.rope and head_dim % 2):
            raise invalid("attention.head_dim", self.head_dim, "a positive integer, even with RoPE")
        if self.rope_theta <= 0:
            raise invalid("attention.rope_theta", self.rope_theta, "a positive number")
        if self.backend not in ATTENTION_BACKENDS:
            raise invalid("attention.backend", self.backend, str(ATTENTION_BACKENDS))


def _import_fa4() -> Callable | None:
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def _import_fa2() -> Callable | None:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def _flash_eligibility(device: torch.device, dtype: torch.dtype) -> tuple[int | None, str]:
    """(major compute capability or None, why not) for the FlashAttention backends."""
    if device.type != "cuda":
        return None, f"device is {device.type}"
    if dtype not in _FLASH_DTYPES:
        return None, f"FlashAttention needs fp16/bf16, activations are {dtype}"
    return torch.cuda.get_device_capability(device)[0], ""


@cache
def select_backend(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, reason) for prefill on `device` in `dtype`; logs each new choice once."""
    major, why_not = _flash_eligibility(device, dtype)
    if requested == "sdpa":
        choice = ("sdpa", "requested")
    elif major is None:
        choice = ("sdpa", why_not)
    elif requested in ("auto", "fa4") and major in (9, 10) and _import_fa4() is not None:
        choice = ("fa4", f"flash-attn-4 on sm{major}x")
    elif requested in ("auto", "fa2") and major >= 8 and _import_fa2() is not None:
        choice = ("fa2", f"flash-attn 2 on sm{major}x")
    else:
        choice = ("sdpa", f"no usable flash-attn for sm{major}x")
    if requested not in ("auto", choice[0]):
        raise ValueError(f"attention.backend={requested!r} is unavailable here: {choice[1]}")
    log.info("attention backend: %s (%s)", *choice)
    return choice


@cache
def _import_fa4_decode() -> Callable | None:
    """flash-attn-4's varlen entry point if it takes per-sequence cache lengths (`seqused_k`);
    looked up once, since every eager decode step calls it."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError:
        return None
    return (
        flash_attn_varlen_func
        if "seqused_k" in signature(flash_attn_varlen_func).parameters
        else None
    )


@cache
def select_decode_backend(
    requested: str, device: torch.device, dtype: torch.dtype, head_dim: int
) -> tuple[str, str]:
    """(backend, reason) for a decode step. Under `auto` on CUDA (sm80+), the Triton split-KV
    kernel (`hybrid.kernels.attention_decode`) where it takes the head dim: its splits fill the SMs
    at any batch, where flash-attn-4 on Hopper and SDPA run one CTA per (sequence, KV head).
    Otherwise flash-attn-4 against the cache where the prefill runs flash-attn-4 and its
    varlen call takes `seqused_k`, else SDPA (also under a requested fa2: only flash-attn-4's
    decode is wired). Logs each new choice once."""
    from hybrid.kernels.attention_decode import head_dim_reason

    prefill, why = select_backend(requested, device, dtype)
    split_kv = (
        requested == "auto"
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 8  # its tl.dot takes bf16
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
        and head_dim_reason(head_dim) is None
    )
    if split_kv:
        choice = ("split-kv", "Triton split-KV kernel: the context split over the SMs")
    elif prefill != "fa4":
        choice = ("sdpa", why if prefill == "sdpa" else "no flash-attn 2 decode path is wired")
    elif _import_fa4_decode() is None:
        choice = ("sdpa", "this flash-attn-4 has no seqused_k in flash_attn_varlen_func")
    else:
        choice = ("fa4", f"{why}, flash_attn_varlen_func with seqused_k")
    log.info("attention decode backend: %s (%s)", *choice)
    return choice


def rope_rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding, rotate-half convention: x (Bt, T, heads, D), positions (T,) shared
    or (Bt, T) per sequence (a device tensor: no host sync, so decode steps can be graphed).
    One Triton kernel each way on CUDA (`hybrid.kernels.rope`), PyTorch elsewhere."""
    if x.is_cuda:
        from hybrid.kernels.rope import rope_triton

        return rope_triton(x, positions, theta)
    return rope_rotate_torch(x, positions, theta)


def rope_rotate_torch(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """`rope_rotate` in PyTorch (float32 or wider): the CPU path and the kernel's oracle."""
    head_dim = x.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=cdt) / head_dim)
    angles = positions.to(cdt)[..., None] * inv_freq
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)[..., None, :]
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1)[..., None, :]
    xf = x.to(cdt)
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def sdpa_decode(q: Tensor, cache: KVCache) -> Tensor:
    """q (Bt, 1, H, D) against the whole cache buffer, positions at or past each sequence's
    `seqlens` masked: shapes never depend on the position. The query heads of one KV head ride
    along the query axis, so no SDPA backend needs GQA support or repeated keys."""
    batch, _, heads, head_dim = q.shape
    kv_heads = cache.k.shape[1]
    visible = torch.arange(cache.max_seqlen, device=q.device) < cache.seqlens[:, None]
    out = F.scaled_dot_product_attention(
        q.reshape(batch, kv_heads, heads // kv_heads, head_dim),
        cache.k,
        cache.v,
        attn_mask=visible[:, None, None, :],
    )
    return out.reshape(batch, 1, heads, head_dim)


@on_input_device
def fa4_decode(q: Tensor, cache: KVCache) -> Tensor:
    """flash-attn-4 over the cache, reading `seqlens` keys per sequence on the device. The
    cache's (Bt, H_kv, S, D) buffers go in as (Bt, S, H_kv, D) views (strides, no copy).
    Hopper's kernel has no split-KV; Blackwell picks its split count by heuristic (0)."""
    out = _import_fa4_decode()(
        q,
        cache.k.transpose(1, 2),
        cache.v.transpose(1, 2),
        seqused_k=cache.seqlens,
        num_splits=1 if torch.cuda.get_device_capability(q.device)[0] == 9 else 0,
    )
    return out[0] if isinstance(out, tuple) else out


@register("attention", symbol="*", config=AttentionConfig)
class Attention(Layer):
    is_mixer = True

    def __init__(self, d_model: int, config: AttentionConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.n_heads, self.kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.head_size(d_model)
        width = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        self.qkv = Linear(d_model, width, device=device, dtype=dtype)
        self.out_proj = Linear(self.n_heads * self.head_dim, d_model, device=device, dtype=dtype)
        self.out_proj.is_residual_out = True

    def allocate_cache(self, batch, max_seqlen, *, device, dtype) -> KVCache:
        return KVCache.empty(
            batch, self.kv_heads, max_seqlen, self.head_dim, device=device, dtype=dtype
        )

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        return self._attend(self.qkv(x), cache)

    def _attend(self, qkv: Tensor, cache: KVCache | None) -> Tensor:
        """The layer from its qkv projection (Bt, T, width) on."""
        batch, length, _ = qkv.shape
        q, k, v = self._split_qkv(qkv)
        if cache is not None and length == 1:
            out = self._decode(q, k, v, cache)
        else:
            out = self._prefill(q, k, v, cache)
        return self.out_proj(out.reshape(batch, length, self.n_heads * self.head_dim))

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None) -> Tensor:
        """Tokens at host offsets: from position 0 (flash, causal) or after a filled cache."""
        length = q.shape[1]
        offset = cache.length if cache is not None else 0
        if cache is not None and self._one_kernel_append(q) and not torch.is_grad_enabled():
            q, k = self._append_prompt(q, k, v, cache)
            keys, values = cache.k[:, :, : offset + length], cache.v[:, :, : offset + length]
        else:
            if self.config.rope:
                positions = torch.arange(offset, offset + length, device=q.device)
                q = rope_rotate(q, positions, self.config.rope_theta)
                k = rope_rotate(k, positions, self.config.rope_theta)
            if cache is not None:
                keys, values = cache.append(k.transpose(1, 2), v.transpose(1, 2))
        backend, _ = select_backend(self.config.backend, q.device, q.dtype)
        if backend != "sdpa" and offset == 0:
            return self._flash(backend, q, k, v)
        if offset == 0:
            return self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), 0)
        return self._sdpa(q, keys, values, offset)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> Tensor:
        """One token per sequence at the device positions `cache.seqlens`: no host offset, so
        a CUDA graph of the step is valid at every position."""
        q = self._append_token(q, k, v, cache)
        backend, _ = select_decode_backend(self.config.backend, q.device, q.dtype, q.shape[-1])
        if backend == "split-kv":
            from hybrid.kernels.attention_decode import split_kv_decode

            return split_kv_decode(q, cache.k, cache.v, cache.seqlens)
        return fa4_decode(q, cache) if backend == "fa4" else sdpa_decode(q, cache)

    def _append_token(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> Tensor:
        """RoPE of q and k at the device positions `cache.seqlens`, k and v written there, the
        positions advanced; returns the rotated q. On CUDA one kernel does it all."""
        theta = float(self.config.rope_theta)
        if self._one_kernel_append(q):
            from hybrid.kernels.attention_decode import append_token
            from hybrid.kernels.rope import inverse_frequencies

            rope = self.config.rope
            inv_freq = inverse_frequencies(self.head_dim, theta, q.device) if rope else None
            cache.check_room(1)
            q = append_token(q, k, v, cache.k, cache.v, cache.seqlens, inv_freq)
            cache.advance(1)
            return q
        if self.config.rope:
            positions = cache.seqlens[:, None]
            q, k = rope_rotate(q, positions, theta), rope_rotate(k, positions, theta)
        cache.append_token(k.transpose(1, 2), v.transpose(1, 2))
        return q

    def _one_kernel_append(self, q: Tensor) -> bool:
        """Whether RoPE and the cache writes run as one kernel: on CUDA, for an even head dim
        (the kernels move a head as two halves; NoPE allows an odd one)."""
        return q.is_cuda and self.head_dim % 2 == 0

    def _append_prompt(
        self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache
    ) -> tuple[Tensor, Tensor]:
        """A prefill's tokens into the cache at its host offset, without autograd: RoPE of q
        and k there, k and v written, the positions advanced, one kernel on CUDA (the same
        bits as the rotations and copies it replaces); returns the rotated q and k."""
        from hybrid.kernels.kv_prompt import append_prompt
        from hybrid.kernels.rope import inverse_frequencies

        theta = float(self.config.rope_theta)
        inv_freq = inverse_frequencies(self.head_dim, theta, q.device) if self.config.rope else None
        cache.check_room(q.shape[1])
        q, k = append_prompt(q, k, v, cache.k, cache.v, cache.seqlens, cache.length, inv_freq)
        cache.advance(q.shape[1])
        return q, k

    def _split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projection (Bt, T, width) -> q (Bt, T, H, D), k and v (Bt, T, H_kv, D)."""
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        return (
            q.unflatten(-1, (self.n_heads, self.head_dim)),
            k.unflatten(-1, (self.kv_heads, self.head_dim)),
            v.unflatten(-1, (self.kv_heads, self.head_dim)),
        )

    def _flash(self, backend: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        fn = _import_fa4() if backend == "fa4" else _import_fa2()
        # its backward adds dq blocks with atomics unless asked not to (train.deterministic)
        deterministic = torch.are_deterministic_algorithms_enabled()
        with on_device(q.device):
            out = fn(q, k, v, causal=True, deterministic=deterministic)
        return out[0] if isinstance(out, tuple) else out

    def _sdpa(self, q: Tensor, keys: Tensor, values: Tensor, offset: int) -> Tensor:
        """q (Bt, T, H, D) against keys/values (Bt, H_kv, offset + T, D), causal."""
        length = q.shape[1]
        if offset == 0:
            mask, causal = None, length > 1
        else:
            rows = torch.arange(length, device=q.device)[:, None] + offset
            mask = torch.arange(keys.shape[2], device=q.device)[None, :] <= rows
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=self.kv_heads != self.n_heads,
        )
        return out.transpose(1, 2)

    def step_projection(self) -> Linear:
        return self.qkv

    def step_projected(self, projected: Tensor, cache: KVCache) -> Tensor:
        return self._attend(projected.unsqueeze(1), cache).squeeze(1)

    def flops_per_token(self, seq_len: int) -> int:
        d_model = self.qkv.in_features
        projections = 2 * d_model * (self.qkv.out_features + self.out_proj.in_features)
        mean_keys = (seq_len + 1) / 2  # causal prefill
        scores_and_mix = 2 * 2 * self.n_heads * self.head_dim * mean_keys
        return int(projections + scores_and_mix)

    def state_bytes(self, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * context * self.kv_heads * self.head_dim * itemsize
