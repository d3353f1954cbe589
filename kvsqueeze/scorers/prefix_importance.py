"""PrefixKV's scores (Wang et al., NeurIPS'25): head-averaged prompt column sums, then a decode FIFO.

Spec (reference/eviction-methods.md §4b, d). At prefill, ``s(j) = sum_i mean_h A[h, i, j]`` over every
prompt query (chunked, fp32), the same for all KV heads of the layer, so the selection is shared by them.
While decoding, PrefixKV deletes the row at a fixed index ``d = kept - 25`` (the middle if that is below 1):
the rows before ``d`` are frozen and the rows from ``d`` on, generated tokens included, form a FIFO. As
scores: frozen rows get +inf and the others their position, so the oldest unfrozen row goes first. The
index is fixed at the first decode step, which makes this scorer stateful per layer.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer, reduce_group


class PrefixImportanceScorer(Scorer):
    """Column sums averaged over all query heads at prefill; a FIFO past a frozen prefix when decoding."""

    name: ClassVar[str] = "prefix_importance"

    def __init__(self, distance: int = 25) -> None:
        self.distance = distance
        self.frozen_below: torch.Tensor | None = None  # (B,) first unfrozen position, set at the first decode

    def select_batch(self, indices: torch.Tensor) -> None:
        if self.frozen_below is not None:
            self.frozen_below = self.frozen_below[indices]

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        if obs.is_prefill:
            return self._importance(obs)
        positions = obs.key_positions.float()  # (B, H_kv, T)
        if self.frozen_below is None:
            self.frozen_below = self._fifo_start(obs)
        frozen = obs.key_positions < self.frozen_below[:, None, None]
        return positions.masked_fill(frozen, float("inf"))

    def _importance(self, obs: Observation) -> torch.Tensor:
        total = reduce_group(obs.column_sums(), "mean")  # (B, H_kv, T)
        return total.mean(dim=1, keepdim=True).expand_as(total).contiguous()  # mean over all heads

    def _fifo_start(self, obs: Observation) -> torch.Tensor:
        """(B,) position of the row at index ``d`` among the rows kept of the prompt (head 0: shared)."""
        first_new = obs.query_positions[:, 0]  # (B,)
        prompt_rows = obs.key_valid[:, 0] & (obs.key_positions[:, 0] < first_new[:, None])  # (B, T)
        kept = prompt_rows.sum(-1)  # (B,)
        index = kept - self.distance
        index = torch.where(index < 1, kept // 2, index).clamp(min=0)
        return obs.key_positions[:, 0].gather(1, index[:, None].to(torch.long))[:, 0]
