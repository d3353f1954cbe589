"""Key-norm scorer (Devoto et al., 2024, "A simple and effective L2 norm-based strategy for KV cache
compression"): keys with a *low* L2 norm draw high attention, so score = -||k||."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer


class KeyNormScorer(Scorer):
    """Score = -||k||_2 per row and KV head; needs no attention weights at all."""

    name: ClassVar[str] = "key_norm"
    needs_attention: ClassVar[bool] = False

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        return -obs.keys.float().norm(dim=-1)  # (B, H_kv, T)
