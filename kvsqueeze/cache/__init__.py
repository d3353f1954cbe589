"""The compressed cache: packed ragged storage (full precision or quantized tiers), one layer object per model layer."""

from kvsqueeze.cache.budget import Budget
from kvsqueeze.cache.cache import SUPPORTED_ARCHITECTURES, SqueezeCache, check_architecture
from kvsqueeze.cache.layer import SqueezeLayer
from kvsqueeze.cache.packed import PackedRows
from kvsqueeze.cache.tiered import QuantizedTier, TieredRows

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Budget",
    "PackedRows",
    "QuantizedTier",
    "SqueezeCache",
    "SqueezeLayer",
    "TieredRows",
    "check_architecture",
]
