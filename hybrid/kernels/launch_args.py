"""How tensors are handed to the Triton kernels as pointer arguments: optional ones, and
token-major or head-split ones that may be column slices of a projection; and the head
dims the head-halving kernels refuse."""

from __future__ import annotations

from torch import Tensor


def pointer_or(t: Tensor | None, fallback: Tensor) -> Tensor:
    """An optional tensor as a kernel's pointer argument: where it is absent, any tensor
    stands in (the kernel's constexpr flag keeps it from being read)."""
    return t if t is not None else fallback


def token_major(t: Tensor) -> Tensor:
    """t itself when each token's entries are contiguous (a column slice of the in_proj
    output, say), else a contiguous copy. The Triton kernels take the token stride as an
    argument, so slicing the projection costs no copy."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t if t.shape[0] == 1 or t.stride(0) >= expected else t.contiguous()


def heads_contiguous(t: Tensor) -> Tensor:
    """t itself when each head's values are contiguous and its heads adjacent (a head-split
    column slice of a projection, any outer strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def even_head_dim(kernel: str, head_dim: int) -> None:
    """The RoPE and cache-append kernels move a head as two halves: an odd head dim (NoPE
    allows one) would lose its last value, so it is refused."""
    if head_dim % 2:
        raise ValueError(f"{kernel} takes an even head_dim (a head moves as two halves), "
                         f"got {head_dim}")  # fmt: skip
