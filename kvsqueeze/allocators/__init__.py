"""Allocators: how the budget splits over layers and heads. See :mod:`kvsqueeze.allocators.base`."""

from kvsqueeze.allocators.base import Allocator, LayerRequest
from kvsqueeze.allocators.heads import AdaKVHeads, HeadAllocator, MassHeads, UniformHeads
from kvsqueeze.allocators.pyramid import PyramidAllocator
from kvsqueeze.allocators.uniform import UniformAllocator

ALLOCATORS: dict[str, type[Allocator]] = {cls.name: cls for cls in (UniformAllocator, PyramidAllocator)}

__all__ = [
    "ALLOCATORS",
    "AdaKVHeads",
    "Allocator",
    "HeadAllocator",
    "LayerRequest",
    "MassHeads",
    "PyramidAllocator",
    "UniformAllocator",
    "UniformHeads",
]
