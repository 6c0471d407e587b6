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
    """Preallocated keys and values (Bt, kv_heads, max_seqlen, head_dim).

    `seqlens` (Bt,) int32 on the cache's device counts the filled positions per sequence: a
    decode step reads and advances it on the device, so one CUDA graph of the step serves
    every position. `length` is the same count on the host, for prefills (which slice at
    host offsets) and overflow checks; eager calls keep both, and whoever replays a graph of
    a step calls `advance` for it (a replay moves only `seqlens`).
    """

    k: Tensor
    v: Tensor
    seqlens: Tensor
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
            torch.zeros(batch, device=device, dtype=torch.int32),
        )

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[2]

    def check_room(self, n_new: int) -> None:
        end = self.length + n_new
        if end > self.max_seqlen:
            raise ValueError(
                f"KV cache holds max_seqlen={self.max_seqlen} tokens; {end} were asked for "
                "(allocate the cache with a larger max_seqlen)"
            )

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (Bt, kv_heads, T, head_dim) at the host offset `length`; return every key and
        value so far."""
        self.check_room(k.shape[2])
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.seqlens.add_(k.shape[2])
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def append_token(self, k: Tensor, v: Tensor) -> None:
        """Write one token per sequence, (Bt, kv_heads, 1, head_dim), at its device position
        `seqlens` and advance it: no host offset, so the same kernels serve every position."""
        self.check_room(1)
        index = self.seqlens.long().view(-1, 1, 1, 1).expand_as(k)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        self.seqlens.add_(1)
        self.length += 1

    def advance(self, n: int) -> None:
        """Count on the host `n` tokens that replayed graphs already wrote on the device."""
        self.length += n

    def rewind(self, seqlen: int) -> None:
        """Forget the positions after `seqlen` (the device count too: inside a captured graph
        the rewind is replayed)."""
        self.length = seqlen
        self.seqlens.fill_(seqlen)

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
                layer.rewind(seqlen)

    def reset(self) -> None:
        """Empty every layer in place (SSM states zeroed, KV positions back to 0; stale keys
        stay, masked), so graphs captured on this cache stay valid."""
        self.seqlen = 0
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.rewind(0)
            elif layer is not None:
                layer.zero_()

    def advance(self, n: int) -> None:
        """Count on the host `n` tokens that replayed graphs of `step` already ran."""
        self.seqlen += n
        for layer in self.layers:
            if layer is not None:
                layer.advance(n)
