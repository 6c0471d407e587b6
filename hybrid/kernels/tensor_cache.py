"""A cache for functions that build small device tensors reused by every later call (RoPE's
inverse frequencies, a batch layout's chunk table).

The tensors are always made outside inference mode. One first built under
`torch.inference_mode()` (an evaluation, a latency measurement, `generate`) would be an
inference tensor, and a later training step that saves it for its backward would fail with
"Inference tensors cannot be saved for backward".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def tensor_cache(maxsize: int | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """`functools.lru_cache(maxsize)` whose misses run with inference mode off."""

    def wrap(build: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args):
            with torch.inference_mode(False):
                return build(*args)

        return cached

    return wrap
