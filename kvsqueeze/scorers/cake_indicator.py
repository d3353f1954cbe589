"""CAKE's eviction indicator (Qin et al., ICLR'25): mean plus gamma times variance of window attention.

Spec (reference/eviction-methods.md §2b): for each query head and stored row ``j``,
``I(j) = mean_i A[i, j] + gamma * Var_i A[i, j]`` over the last ``w`` queries (unbiased variance), average
pooled over the token axis (kernel 5), then averaged over each GQA group. At a decode step there is one
query, so the indicator is that query's attention row (no variance), pooled the same way.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer, pool_scores, reduce_group


def window_probabilities(obs: Observation, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention of the last ``window`` queries, (B, H_kv, g, w, T) over every stored row, and how
    many of those queries are real per sequence, (B,)."""
    start = obs.last_queries(window)
    probs = obs.probabilities(start)  # (B, H_kv, g, w, T')
    t = obs.key_positions.shape[-1]
    probs = torch.nn.functional.pad(probs, (0, t - probs.shape[-1]))
    return probs, obs.query_valid[:, start:].sum(-1)


def mean_and_variance(probs: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over the query axis (3) of (B, H_kv, g, w, T), counting ``count`` (B,)
    real queries (padding queries have all-zero rows); the variance is 0 with fewer than two queries."""
    n = count.clamp(min=1).to(probs.dtype)[:, None, None, None]
    mean = probs.sum(3) / n
    real = torch.arange(probs.shape[3], device=probs.device)[None, :] >= probs.shape[3] - count[:, None]
    centered = (probs - mean[:, :, :, None]) * real[:, None, None, :, None]  # (B, H_kv, g, w, T)
    variance = centered.pow(2).sum(3) / (count - 1).clamp(min=1).to(probs.dtype)[:, None, None, None]
    return mean, variance


class CakeIndicatorScorer(Scorer):
    """``mean + gamma * variance`` of the window's attention onto every stored row, pooled."""

    name: ClassVar[str] = "cake_indicator"

    def __init__(self, window: int = 32, gamma: float = 200.0, kernel: int = 5, pooling: str = "avg") -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.gamma, self.kernel, self.pooling = window, gamma, kernel, pooling

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        probs, count = window_probabilities(obs, self.window)
        mean, variance = mean_and_variance(probs, count)  # (B, H_kv, g, T)
        indicator = mean + self.gamma * variance
        b, h, g, t = indicator.shape
        pooled = pool_scores(indicator.reshape(b, h * g, t), self.kernel, self.pooling).view(b, h, g, t)
        return reduce_group(pooled, "mean")
