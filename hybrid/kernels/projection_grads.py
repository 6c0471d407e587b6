"""One buffer for the gradient of a split projection, written in place by the kernels that
consume its pieces.

Mamba-3's in_proj output is split into z, x, B, C, dt, A, trap and angle. `torch.split`'s
backward joins the pieces' gradients with a `cat`: a copy of the whole (tokens, width)
gradient, 8 × 62 µs of a 15.3 ms training step of the 21M hybrid (H100, BENCHMARKS.md).
`split_projection` instead hands out a `ProjectionGrads`: a backward kernel that consumes a
piece asks it for that piece's columns of one buffer (`output`) and writes its gradient
there, and the split's backward returns the buffer. Whatever did not arrive that way (a
piece consumed twice, whose gradients autograd summed; a consumer that does not take the
buffer, as the CPU path) is copied in, and a piece with no gradient is zeroed, so the
result is `torch.split`'s gradient whoever the consumers are.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def _allocate(shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The buffer's memory (the checks poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, device=device, dtype=dtype)


class ProjectionGrads:
    """The gradient buffer of one split projection, for one backward pass: allocated at the
    first request (a backward, not the forward, holds it), handed to the split by `take`."""

    def __init__(self, projected: Tensor, widths: dict[str, int]):
        self._layout = (projected.shape, projected.device, projected.dtype)
        starts = itertools.accumulate(widths.values(), initial=0)  # one more than widths
        self.columns = {
            name: (start, widths[name]) for name, start in zip(widths, starts, strict=False)
        }
        self._buffer: Tensor | None = None

    def piece(self, buffer: Tensor, name: str) -> Tensor:
        """Piece `name`'s columns of `buffer`."""
        start, width = self.columns[name]
        return buffer[..., start : start + width]

    def output(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The columns of piece `name`, viewed as `shape`: where its consumer writes the
        piece's gradient."""
        if self._buffer is None:
            self._buffer = _allocate(*self._layout)
        return self.piece(self._buffer, name).view(shape)

    def take(self) -> Tensor:
        """The buffer of this backward pass (a new one for the next: retain_graph)."""
        buffer = self._buffer if self._buffer is not None else _allocate(*self._layout)
        self._buffer = None
        return buffer


def gradient_output(
    grads: ProjectionGrads | None, name: str, shape: tuple[int, ...], like: Tensor
) -> Tensor:
    """Where a backward kernel writes piece `name`'s gradient: its columns of the buffer, or
    a new tensor like `like` when the input is not a piece of a split projection."""
    if grads is None:
        return _allocate(shape, like.device, like.dtype)
    return grads.output(name, shape)


def _is_view_of(grad: Tensor, piece: Tensor) -> bool:
    return (
        grad.data_ptr() == piece.data_ptr()
        and grad.shape == piece.shape
        and grad.stride() == piece.stride()
    )


class _SplitProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected: Tensor, grads: ProjectionGrads) -> tuple[Tensor, ...]:
        ctx.grads = grads
        ctx.set_materialize_grads(False)  # an unused piece's gradient: None, zeroed in place
        return tuple(
            projected[..., start : start + width] for start, width in grads.columns.values()
        )

    @staticmethod
    def backward(ctx, *piece_grads: Tensor | None) -> tuple[Tensor, None]:
        grads = ctx.grads
        buffer = grads.take()
        for name, grad in zip(grads.columns, piece_grads, strict=True):
            piece = grads.piece(buffer, name)
            if grad is None:
                piece.zero_()
            elif not _is_view_of(grad, piece):
                piece.copy_(grad)
        return buffer, None


def plain_split(projected: Tensor, widths: dict[str, int]) -> tuple[dict[str, Tensor], None]:
    """`split_projection` without a buffer: `torch.split`, whose backward joins the pieces'
    gradients with a `cat` (where no gradient flows, and the GPU test's baseline)."""
    pieces = projected.split(list(widths.values()), dim=-1)
    return dict(zip(widths, pieces, strict=True)), None


def split_projection(
    projected: Tensor, widths: dict[str, int]
) -> tuple[dict[str, Tensor], ProjectionGrads | None]:
    """The pieces of `projected`'s last axis (views, in the order of `widths`) and, where a
    gradient will flow, the `ProjectionGrads` their consumers may write into (None: a plain
    split, nothing to write)."""
    if not (torch.is_grad_enabled() and projected.requires_grad):
        return plain_split(projected, widths)
    grads = ProjectionGrads(projected, widths)
    pieces = _SplitProjection.apply(projected, grads)
    return dict(zip(widths, pieces, strict=True)), grads
