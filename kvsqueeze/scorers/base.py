"""Scorers say how important each cached row is, per sequence, layer and KV head.

A scorer reads an :class:`~kvsqueeze.attention.observation.Observation` and returns one fp32 score per
stored row, shape (B, H_kv, T); higher means keep. GQA is handled the same way everywhere: score per query
head, reduce over each KV head's group (mean by default), so selection happens per KV head and memory
really drops.

Stateful scorers (``stateful = True``) accumulate over steps; the cache keeps their running score beside
each row, gathers it with the row, and hands it back as ``state``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvsqueeze.attention.observation import Observation


class Scorer(ABC):
    """Base class: subclasses implement :meth:`score`."""

    name: ClassVar[str] = "scorer"
    stateful: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = True  # False for scorers that never look at queries
    needs_hidden_states: ClassVar[bool] = False  # True: the attention's input is handed to the layer (KVzap)
    replays: ClassVar[bool] = False  # True: scored after the prompt by replaying it (KVzip), not in its call

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep the per-sequence state of sequences ``indices`` (beam reordering); stateless: nothing."""
        return None

    @abstractmethod
    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        """Importance of every stored row, (B, H_kv, T) fp32. ``state`` is the running score of stateful
        scorers, padded like the keys, with zeros for rows appended in this call."""


def reduce_group(per_query_head: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, H_kv, g, ..., T) -> (B, H_kv, ..., T): reduce each KV head's group of query heads."""
    if how == "mean":
        return per_query_head.mean(dim=2)
    if how == "max":
        return per_query_head.amax(dim=2)
    raise ValueError(f"group reduction must be 'mean' or 'max', got {how!r}")


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling over the token axis of (B, H_kv, T) scores (stride 1, padding kernel // 2).

    Average pooling counts the zero padding at the edges, as SnapKV's code does.
    """
    if kernel <= 1:
        return scores
    b, h, t = scores.shape
    flat = scores.reshape(b * h, 1, t)
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    elif pooling == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    return pooled[..., :t].reshape(b, h, t)
