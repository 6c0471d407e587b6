"""Model configuration: a stack of layer specs, written as a pattern string or a list.

Pattern notation (Megatron-LM's hybrid_override_pattern): one character per sublayer, `M`
Mamba-3 mixer, `*` attention mixer, `-` SwiGLU MLP; `M-M-*-` is three mixers (two Mamba-3,
one attention), each followed by an MLP. The attention ratio counts mixers only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy

from hybrid.errors import invalid
from hybrid.layers import registry


@dataclass(frozen=True)
class LayerSpec:
    """One sublayer: its registry name and its config dataclass."""

    kind: str
    config: Any

    @property
    def symbol(self) -> str:
        return registry.entry(self.kind).symbol


def layer_config(kind: str, options: Any = None) -> Any:
    """The config dataclass of layer `kind` from an instance, a mapping, or None (defaults)."""
    cls = registry.entry(kind).config_cls
    if options is None:
        return cls()
    if isinstance(options, cls):
        return options
    if not isinstance(options, Mapping):
        raise invalid(kind, options, f"a {cls.__name__} or a mapping of its fields")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in known:
            raise invalid(f"{kind}.{key}", options[key], f"one of the keys {known}")
    return cls(**options)


def _number(value: Any) -> bool:
    """A Python or numpy number that is not a boolean."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | numpy.bool_)


_KINDS = {  # a field's type -> (what a value must be, how the error says it, its Python type)
    bool: (lambda v: isinstance(v, bool | numpy.bool_), "true or false", bool),
    int: (lambda v: _number(v) and isinstance(v, numbers.Integral), "an integer", int),
    float: (lambda v: _number(v) and math.isfinite(v), "a finite number", float),
    str: (lambda v: isinstance(v, str), "a string", str),
}


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A config class's field types, resolved once (every model built checks its layers)."""
    return typing.get_type_hints(cls)


def check_field_types(kind: str, config: Any) -> None:
    """Raise ValueError for a layer option of the wrong type (`true` as a head count, a
    string as a number, `"no"` as a switch, which is truthy), before the layer's own range
    checks compare it with anything."""
    hints = _type_hints(type(config))
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        nullable = hint in (bool | None, int | None, float | None, str | None)
        base = typing.get_args(hint)[0] if nullable else hint
        value = getattr(config, f.name)
        if base in _KINDS and not (value is None and nullable):
            ok, allowed, python = _KINDS[base]
            if not ok(value):
                raise invalid(f"{kind}.{f.name}", value, allowed + (" or null" * nullable))
            # numpy scalars as Python ones: configs go to JSON, YAML and MLflow
            object.__setattr__(config, f.name, python(value))


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid(name, value, "a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """A hybrid LM: token embedding, `layers` as pre-norm residual blocks, final RMSNorm and
    a head tied to the embedding. Validates everything on construction."""

    d_model: int
    layers: tuple[LayerSpec, ...]
    vocab_size: int = 256
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        _positive_int("d_model", self.d_model)
        _positive_int("vocab_size", self.vocab_size)
        if not self.norm_eps > 0:
            raise invalid("norm_eps", self.norm_eps, "a positive number")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise invalid("layers", self.layers, "at least one layer")
        for spec in self.layers:
            entry = registry.entry(spec.kind)
            if not isinstance(spec.config, entry.config_cls):
                raise invalid(f"{spec.kind} config", spec.config, f"a {entry.config_cls.__name__}")
            check_field_types(spec.kind, spec.config)
            spec.config.validate(self.d_model)

    @classmethod
    def from_layer_types(
        cls,
        layer_types: Sequence[str],
        *,
        d_model: int,
        vocab_size: int = 256,
        norm_eps: float = 1e-5,
        tie_embeddings: bool = True,
        **layer_options: Any,
    ) -> ModelConfig:
        """Every layer of one kind shares the options given under its name, e.g.
        `mamba3={"d_state": 64}` or `attention=AttentionConfig(n_heads=4)`."""
        given = {name: layer_config(name, options) for name, options in layer_options.items()}
        for name in given.keys() - set(layer_types):
            # a kind the pattern lacks: its keys and their types are still checked (a typo is
            # refused), not its fit to d_model (a search passes every kind's section); the
            # pattern's kinds are checked with the model
            check_field_types(name, given[name])
        configs = {name: given.get(name) or layer_config(name) for name in set(layer_types)}
        layers = tuple(LayerSpec(name, configs[name]) for name in layer_types)
        return cls(d_model, layers, vocab_size, norm_eps, tie_embeddings)

    def with_layer_options(self, **layer_options: Mapping[str, Any]) -> ModelConfig:
        """A copy in which every layer of each named kind takes these option values (its other
        options kept), e.g. `config.with_layer_options(mamba3={"mimo_rank": 4})`."""
        for name in layer_options:
            registry.entry(name)
        layers = tuple(
            LayerSpec(
                spec.kind,
                layer_config(
                    spec.kind, {**dataclasses.asdict(spec.config), **layer_options[spec.kind]}
                ),
            )
            if spec.kind in layer_options
            else spec
            for spec in self.layers
        )
        return dataclasses.replace(self, layers=layers)

    @classmethod
    def from_pattern(cls, pattern: str, **kwargs: Any) -> ModelConfig:
        """Parse Megatron notation, e.g. `ModelConfig.from_pattern("M-M-*-", d_model=512)`."""
        return cls.from_layer_types(parse_pattern(pattern), **kwargs)

    @property
    def layer_types(self) -> list[str]:
        return [spec.kind for spec in self.layers]

    @property
    def pattern(self) -> str:
        return format_pattern(self.layer_types)

    @property
    def n_mixers(self) -> int:
        return sum(registry.entry(spec.kind).is_mixer for spec in self.layers)

    @property
    def attention_ratio(self) -> float:
        """Attention mixers over all mixers (MLPs are not counted); 0 without mixers."""
        mixers = self.n_mixers
        attention = sum(spec.kind == "attention" for spec in self.layers)
        return attention / mixers if mixers else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for YAML, JSON and MLflow params); `from_dict` inverts it."""
        return {
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "norm_eps": self.norm_eps,
            "tie_embeddings": self.tie_embeddings,
            "pattern": self.pattern,
            "layers": [
                {"kind": spec.kind, **dataclasses.asdict(spec.config)} for spec in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        layers = tuple(
            LayerSpec(
                item["kind"],
                layer_config(item["kind"], {k: v for k, v in item.items() if k != "kind"}),
            )
            for item in data["layers"]
        )
        config = cls(
            d_model=data["d_model"],
            layers=layers,
            vocab_size=data.get("vocab_size", 256),
            norm_eps=data.get("norm_eps", 1e-5),
            tie_embeddings=data.get("tie_embeddings", True),
        )
        if "pattern" in data and data["pattern"] != config.pattern:  # a hand-edited file
            raise invalid("pattern", data["pattern"], f"{config.pattern!r}, as its layers say")
        return config


def parse_pattern(pattern: str) -> list[str]:
    """`"M-*-"` -> `["mamba3", "swiglu", "attention", "swiglu"]`."""
    if not isinstance(pattern, str) or not pattern:
        raise invalid("pattern", pattern, "a non-empty string of layer symbols")
    allowed = {registry.entry(name).symbol: name for name in registry.available()}
    types = []
    for position, char in enumerate(pattern):
        if char not in allowed:
            raise invalid(
                "pattern", pattern, f"only the symbols {allowed} (bad {char!r} at {position})"
            )
        types.append(allowed[char])
    return types


def format_pattern(layer_types: Sequence[str]) -> str:
    """`["mamba3", "swiglu"]` -> `"M-"`."""
    return "".join(registry.entry(name).symbol for name in layer_types)
