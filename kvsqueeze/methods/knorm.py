"""Knorm (Devoto et al., EMNLP'24): keep the keys with the lowest L2 norm; needs no attention weights.

Defaults: no window and no sinks, as kvpress's ``KnormPress``; compresses once after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.uniform import UniformAllocator
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.key_norm import KeyNormScorer


@register
@dataclass
class Knorm(Method):
    """Lowest key norms per KV head, plus an optional protected window."""

    name = "knorm"
    summary = "lowest key L2 norm (prefill, attention-free)"
    window: int = 0

    def components(self) -> Components:
        return Components(KeyNormScorer(), UniformAllocator(), window=self.window)
