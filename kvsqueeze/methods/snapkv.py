"""SnapKV (Li et al., NeurIPS'24): keep what the end of the prompt attends to.

Defaults are the official code's: observation window ``w=32``, pooling kernel 5, average pooling. (The
paper's experiments used kernel 7 and max pooling: ``SnapKV(kernel=7, pooling="max")``.) The budget
includes the window. Compresses once after the prompt; decoding appends.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.uniform import UniformAllocator
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.window_attention import WindowAttentionScorer


@register
@dataclass
class SnapKV(Method):
    """Top window-attention rows per KV head, plus the observation window itself."""

    name = "snapkv"
    summary = "window attention with pooling (prefill)"
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    def components(self) -> Components:
        scorer = WindowAttentionScorer(self.window, self.kernel, self.pooling, statistic="sum")
        return Components(scorer, UniformAllocator(), window=self.window)
