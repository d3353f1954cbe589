"""The compressed cache: packed ragged storage, one layer object per model layer."""

from kvsqueeze.cache.budget import Budget
from kvsqueeze.cache.cache import SUPPORTED_ARCHITECTURES, SqueezeCache, check_architecture
from kvsqueeze.cache.layer import SqueezeLayer
from kvsqueeze.cache.packed import PackedRows

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Budget",
    "PackedRows",
    "SqueezeCache",
    "SqueezeLayer",
    "check_architecture",
]
