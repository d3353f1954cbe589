"""Scorers: how important each cached row is. See :mod:`kvsqueeze.scorers.base`."""

from kvsqueeze.scorers.accumulated_attention import AccumulatedAttentionScorer
from kvsqueeze.scorers.base import Scorer, pool_scores, reduce_group
from kvsqueeze.scorers.key_norm import KeyNormScorer
from kvsqueeze.scorers.normalized_attention import NormalizedAttentionScorer
from kvsqueeze.scorers.position import PositionScorer
from kvsqueeze.scorers.random import RandomScorer
from kvsqueeze.scorers.window_attention import WindowAttentionScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        PositionScorer,
        WindowAttentionScorer,
        AccumulatedAttentionScorer,
        KeyNormScorer,
        NormalizedAttentionScorer,
        RandomScorer,
    )
}

__all__ = [
    "SCORERS",
    "AccumulatedAttentionScorer",
    "KeyNormScorer",
    "NormalizedAttentionScorer",
    "PositionScorer",
    "RandomScorer",
    "Scorer",
    "WindowAttentionScorer",
    "pool_scores",
    "reduce_group",
]
