"""The layer registry: every layer a pattern can name, with its config dataclass.

A layer is an `nn.Module` subclass of `Layer`, registered under a name and a one-character
pattern symbol (Megatron-LM's hybrid_override_pattern: `M` Mamba-3, `*` attention, `-` MLP).
Its config dataclass validates itself against d_model before any tensor exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class LayerConfig(Protocol):
    """What the registry needs from a layer's config dataclass."""

    def validate(self, d_model: int) -> None:
        """Raise ValueError naming the field, the value and what is allowed."""


class Layer(nn.Module):
    """Interface of every registered layer (input and output are (Bt, L, d_model)). Under
    autocast a sequence's input arrives in the autocast dtype (the pre-norm writes it so:
    every layer's first operation on it is a projection, which autocast would cast anyway)."""

    is_mixer: bool = False

    def forward(self, x: Tensor, cache: Any = None) -> Tensor:
        """Whole-sequence forward; with a cache, continue from it and leave it updated."""
        raise NotImplementedError

    def step(self, x: Tensor, cache: Any) -> Tensor:
        """One token (Bt, d_model) -> (Bt, d_model), advancing `cache` in place. By default
        `step_projected` after `step_projection`; a layer without one overrides this."""
        projection = self.step_projection()
        if projection is None:
            raise NotImplementedError
        return self.step_projected(projection(x), cache)

    def step_projection(self) -> nn.Linear | None:
        """The bias-free projection `step` applies to its input first, or None. Where there
        is one, `HybridLM` calls `step_projected` with it applied instead of `step`: at batch
        1-2 the block's norm then runs inside the projection's kernel (`add_rms_norm_linear`)
        instead of as a kernel of its own."""
        return None

    def step_projected(self, projected: Tensor, cache: Any) -> Tensor:
        """`step` from `step_projection()(x)` (Bt, out_features) on."""
        raise NotImplementedError

    def allocate_cache(
        self, batch: int, max_seqlen: int, *, device: torch.device, dtype: torch.dtype
    ) -> Any:
        """The empty inference cache for `batch` sequences of up to `max_seqlen` tokens."""
        return None

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token (multiply-add = 2) when prefilling `seq_len` tokens."""
        raise NotImplementedError

    def state_bytes(self, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Inference-cache bytes per sequence at `context` tokens, activations in `dtype`."""
        return 0

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass(frozen=True)
class LayerEntry:
    name: str
    symbol: str
    config_cls: type
    module_cls: type[Layer]

    @property
    def is_mixer(self) -> bool:
        return self.module_cls.is_mixer


_REGISTRY: dict[str, LayerEntry] = {}


def register(name: str, *, symbol: str, config: type) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: make `name` (pattern character `symbol`) buildable."""

    def add(module_cls: type[Layer]) -> type[Layer]:
        if name in _REGISTRY:
            raise ValueError(f"layer {name!r} is already registered")
        taken = {e.symbol: e.name for e in _REGISTRY.values()}
        if len(symbol) != 1 or symbol in taken:
            raise ValueError(f"pattern symbol {symbol!r} for {name!r} must be one free character")
        _REGISTRY[name] = LayerEntry(name, symbol, config, module_cls)
        return module_cls

    return add


def available() -> list[str]:
    """Registered layer names, in registration order."""
    return list(_REGISTRY)


def entry(name: str) -> LayerEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"layer={name!r} is invalid; allowed: {available()}") from None


def entry_for_symbol(symbol: str) -> LayerEntry:
    for e in _REGISTRY.values():
        if e.symbol == symbol:
            return e
    allowed = {e.symbol: e.name for e in _REGISTRY.values()}
    raise ValueError(f"pattern symbol {symbol!r} is invalid; allowed: {allowed}")


def build(
    spec: Any,
    d_model: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Layer:
    """Build the layer a `LayerSpec` (anything with .kind and .config) describes."""
    e = entry(spec.kind)
    if not isinstance(spec.config, e.config_cls):
        raise ValueError(
            f"config for layer {spec.kind!r} is a {type(spec.config).__name__}; "
            f"allowed: {e.config_cls.__name__}"
        )
    spec.config.validate(d_model)
    return e.module_cls(d_model, spec.config, device=device, dtype=dtype)
