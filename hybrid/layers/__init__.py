"""The layer registry and the layers; importing this package registers every layer."""

from hybrid.layers import attention, mamba3, swiglu
from hybrid.layers.registry import Layer, LayerEntry, available, build, entry, register

__all__ = [
    "Layer",
    "LayerEntry",
    "attention",
    "available",
    "build",
    "entry",
    "mamba3",
    "register",
    "swiglu",
]
