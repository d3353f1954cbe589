"""Position scorer (StreamingLLM): the most recent rows score highest; sinks are protected by the method."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer


class PositionScorer(Scorer):
    """Score = absolute position, so keeping the top rows keeps a sliding window of the latest tokens."""

    name: ClassVar[str] = "position"
    needs_attention: ClassVar[bool] = False

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        return obs.key_positions.float()  # (B, H_kv, T)
