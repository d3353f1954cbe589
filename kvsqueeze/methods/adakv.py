"""Ada-KV (Feng et al., NeurIPS'25): SnapKV scores with head-wise budgets from a global top-k.

Defaults are the official code's (reference/eviction-methods.md §8): observation window ``w=32``, window
scores averaged over the window queries and over each GQA group, max pooling with kernel 7, safeguard
``alpha=0.2``. ``layers="pyramid"`` gives Ada-Pyramid (PyramidKV's layer budgets, ``beta=20``, split over
heads the same way). The budget includes the window. Heads keep different numbers of rows and the cache
stores them ragged, so the memory is really freed (kvpress's AdaKVPress masks instead). Prefill only.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.heads import AdaKVHeads
from kvsqueeze.allocators.pyramid import PyramidAllocator
from kvsqueeze.allocators.uniform import UniformAllocator
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.window_attention import WindowAttentionScorer


@register
@dataclass
class AdaKV(Method):
    """Window-attention scores; each layer's budget split over heads by a global top-k with a floor."""

    name = "adakv"
    summary = "window attention, head-wise budgets by global top-k (prefill)"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    alpha: float = 0.2
    layers: str = "uniform"
    beta: float = 20.0

    def validate(self) -> None:
        super().validate()
        if self.layers not in ("uniform", "pyramid"):
            raise ValueError(f"adakv: layers must be 'uniform' or 'pyramid', got {self.layers!r}")

    def components(self) -> Components:
        scorer = WindowAttentionScorer(self.window, self.kernel, self.pooling, statistic="mean")
        allocator = PyramidAllocator(self.beta) if self.layers == "pyramid" else UniformAllocator()
        return Components(scorer, allocator, heads=AdaKVHeads(self.alpha), window=self.window)
