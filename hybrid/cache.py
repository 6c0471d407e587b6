"""Inference caches: a static KV cache per attention layer, the Mamba-3 state per Mamba-3
layer (`hybrid.kernels.mamba3_common.Mamba3State`), and the model-level container."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def tensor_bytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class KVCache:
    """Preallocated keys and values (Bt, kv_heads, max_seqlen, head_dim); `length` filled."""

    k: Tensor
    v: Tensor
    length: int = 0

    @classmethod
    def empty(
        cls,
        batch: int,
        kv_heads: int,
        max_seqlen: int,
        head_dim: int,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> KVCache:
        shape = (batch, kv_heads, max_seqlen, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (Bt, kv_heads, T, head_dim) at the end; return every key and value so far."""
        end = self.length + k.shape[2]
        if end > self.max_seqlen:
            raise ValueError(
                f"KV cache holds max_seqlen={self.max_seqlen} tokens; {end} were asked for "
                "(allocate the cache with a larger max_seqlen)"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)


@dataclass
class InferenceCache:
    """One cache per layer (None for layers without state) and the tokens seen so far."""

    layers: list[Any]
    max_seqlen: int
    seqlen: int = field(default=0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers if c is not None)

    def rewind(self, seqlen: int) -> None:
        """Forget the positions after `seqlen` (KV caches only: an SSM state cannot be
        rewound). Lets a benchmark time many steps at one context length."""
        if not 0 <= seqlen <= self.seqlen:
            raise ValueError(f"seqlen={seqlen} is invalid; allowed: 0..{self.seqlen}")
        self.seqlen = seqlen
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.length = seqlen
