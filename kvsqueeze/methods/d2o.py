"""D2O, Dynamic Discriminative Operations (Wan et al., ICLR'25): layer budgets plus merging.

Defaults are the official code's (reference/eviction-methods.md §3e): heavy and recent halves of the
budget (``hh_ratio = recent_ratio = 0.1`` for a 0.2 budget), 4 sink tokens, EMA ``alpha = beta = 0.5``.
Scores are accumulated attention, as in H2O; layer budgets come from the prompt's column-sum variance
(:mod:`kvsqueeze.allocators.d2o`); every evicted row may be merged into its most similar kept row
(:mod:`kvsqueeze.actions.merge`). The bulk compression runs at the end of the prompt (the official code
runs it at the first decode step, with the budgets computed for ``L + 1`` tokens, which we keep); then
one row is evicted, and possibly merged, at every decode step. ``protect_layers="0,1,-1"`` reproduces
the official code's uncompressed layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.actions.merge import Merge
from kvsqueeze.allocators.d2o import D2OAllocator
from kvsqueeze.methods.base import Components, Method, Schedule, register
from kvsqueeze.scorers.accumulated_attention import AccumulatedAttentionScorer


@register
@dataclass
class D2O(Method):
    """Accumulated attention with variance-based layer budgets; evicted rows merged when similar."""

    name = "d2o"
    summary = "layer budgets from attention variance, H2O eviction plus merging (every step)"
    recent_share: float = 0.5
    sinks: int = 4
    alpha: float = 0.5
    beta: float = 0.5
    protect_layers: str = ""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.recent_share < 1.0:
            raise ValueError(f"d2o: recent_share must be in [0, 1), got {self.recent_share}")
        try:
            self.protected_layers()
        except ValueError:
            raise ValueError(
                f"d2o: protect_layers must be comma-separated layer indices, got {self.protect_layers!r}"
            ) from None

    def protected_layers(self) -> tuple[int, ...]:
        return tuple(int(i) for i in str(self.protect_layers).split(",") if i.strip())

    def components(self) -> Components:
        return Components(
            AccumulatedAttentionScorer(),
            D2OAllocator(self.protected_layers()),
            action=Merge(self.alpha, self.beta),
            schedule=Schedule.EVERY_STEP,
            sinks=self.sinks,
            recent_share=self.recent_share,
        )
