"""PrefixKV (Wang et al., arXiv 2412.03409, NeurIPS'25): one global prefix level for all layers.

Defaults are the official code's (reference/eviction-methods.md §4e): 4 sink tokens and the last prompt
token always kept, bisection tolerance 5 tokens (capped at 50 steps here), decode ``distance=25``. The
budget is the average kept per layer (the code's ``ratio`` is the evicted fraction: ``1 - budget``).
Each layer keeps the top-ranked rows covering the common level of its importance mass, so layers whose
attention is spread keep more. Importance is shared by a layer's heads (the selection is too). The
search runs per prompt (online); after the prompt, each layer keeps its ratio of the tokens seen by
deleting at a fixed index, which freezes the compressed prompt before it, one row per forward call as the
official hook does (a multi-token call grows the cache by the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.prefix import PrefixAllocator
from kvsqueeze.methods.base import Components, Method, Schedule, register
from kvsqueeze.scorers.prefix_importance import PrefixImportanceScorer


@register
@dataclass
class PrefixKV(Method):
    """Per-layer budgets from one cumulative-importance level (bisection); FIFO past a frozen prefix."""

    name = "prefixkv"
    summary = "one global importance level over layers by bisection; decode-time FIFO (every step)"
    sinks: int = 4
    distance: int = 25
    tolerance: int = 5

    def components(self) -> Components:
        return Components(
            PrefixImportanceScorer(self.distance),
            PrefixAllocator(self.tolerance),
            schedule=Schedule.EVERY_STEP,
            window=1,
            sinks=self.sinks,
        )
