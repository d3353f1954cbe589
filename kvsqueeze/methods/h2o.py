"""H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS'23), as the real-drop decode-time algorithm.

Every row's score is the attention it has accumulated (prefill column sums plus every decode query's row).
After the prompt the cache is cut to ``budget = heavy + recent`` rows per KV head; then, at every decode
step, the new row is scored and the lowest-scoring row outside the recent window is evicted, one per step.
Defaults: ``heavy_ratio = recent_ratio = 0.1`` in the paper (a 0.2 budget split evenly), so
``recent_share = 0.5`` of whatever budget you give. No sinks: they survive because they are heavy hitters.
Scores are kept per sequence and per KV head (mean over the GQA group), unlike the official code, which sums
over the batch and breaks on GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.uniform import UniformAllocator
from kvsqueeze.methods.base import Components, Method, Schedule, register
from kvsqueeze.scorers.accumulated_attention import AccumulatedAttentionScorer


@register
@dataclass
class H2O(Method):
    """Heavy hitters by accumulated attention plus a recent window; one eviction per decode step."""

    name = "h2o"
    summary = "accumulated attention, evicts one token per decode step"
    recent_share: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.recent_share < 1.0:
            raise ValueError(f"h2o: recent_share must be in [0, 1), got {self.recent_share}")

    def components(self) -> Components:
        return Components(
            AccumulatedAttentionScorer(),
            UniformAllocator(),
            schedule=Schedule.EVERY_STEP,
            recent_share=self.recent_share,
        )
