"""Window-attention scorer (SnapKV, PyramidKV, Ada-KV): what the last ``window`` queries attend to.

Spec (reference/eviction-methods.md §0): for the last ``w`` queries, softmax(q K^T / sqrt(d)) over all keys
with the causal mask only inside the window, summed (or averaged) over the window queries, reduced over each
GQA group, then 1-D pooled over the token axis. Queries are processed in chunks, in fp32.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer, pool_scores, reduce_group


class WindowAttentionScorer(Scorer):
    """Attention of the observation window onto every stored row, pooled."""

    name: ClassVar[str] = "window_attention"

    def __init__(
        self,
        window: int = 32,
        kernel: int = 5,
        pooling: str = "avg",
        statistic: str = "sum",
        group: str = "mean",
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if statistic not in ("sum", "mean"):
            raise ValueError(f"statistic must be 'sum' or 'mean', got {statistic!r}")
        self.window, self.kernel, self.pooling, self.statistic, self.group = (
            window,
            kernel,
            pooling,
            statistic,
            group,
        )

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        start = obs.last_queries(self.window)
        scores = reduce_group(obs.column_sums(start), self.group)  # (B, H_kv, T)
        if self.statistic == "mean":
            scores = scores / max(1, obs.query_length - start)
        return pool_scores(scores, self.kernel, self.pooling)
