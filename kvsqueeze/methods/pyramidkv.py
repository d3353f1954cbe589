"""PyramidKV (Cai et al., COLM'25): SnapKV scores with budgets that fall linearly with depth.

Defaults are KVCache-Factory's LongBench runner: ``beta=20``, window ``w=8``, kernel 7, max pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.pyramid import PyramidAllocator
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.window_attention import WindowAttentionScorer


@register
@dataclass
class PyramidKV(Method):
    """Window-attention scores, pyramid-shaped layer budgets."""

    name = "pyramidkv"
    summary = "window attention, budgets decreasing with depth (prefill)"
    window: int = 8
    kernel: int = 7
    pooling: str = "max"
    beta: float = 20.0

    def components(self) -> Components:
        scorer = WindowAttentionScorer(self.window, self.kernel, self.pooling, statistic="sum")
        return Components(scorer, PyramidAllocator(self.beta), window=self.window)
