"""Random eviction: the floor every method should beat. Seeded, so runs are reproducible."""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.uniform import UniformAllocator
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.random import RandomScorer


@register
@dataclass
class Random(Method):
    """Uniformly random rows per KV head (compresses once after the prompt)."""

    name = "random"
    summary = "random rows (baseline floor, prefill)"
    seed: int = 0
    window: int = 0

    def components(self) -> Components:
        return Components(RandomScorer(self.seed), UniformAllocator(), window=self.window)
