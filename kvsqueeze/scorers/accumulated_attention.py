"""Accumulated-attention scorer (H2O, Zhang et al., NeurIPS'23).

S(j) = sum over every query processed so far of A[i, j]: the column sums of the causal prefill attention
(computed in query chunks, never L x L), plus every decode query's attention row. New rows enter with their
first score; the score of an evicted row leaves with it. As in the official code, sums are not normalized
by the number of queries that could see a row (early rows are favoured; that is H2O).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer, reduce_group


class AccumulatedAttentionScorer(Scorer):
    """Running sum of the attention every stored row has received, reduced over each GQA group."""

    name: ClassVar[str] = "accumulated_attention"
    stateful: ClassVar[bool] = True

    def __init__(self, group: str = "mean") -> None:
        self.group = group

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        total = reduce_group(obs.column_sums(), self.group)  # (B, H_kv, T)
        return total + state if state is not None else total
