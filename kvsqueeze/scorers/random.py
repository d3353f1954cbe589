"""Random scorer: the floor every method should beat. Seeded, so runs are reproducible."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer


class RandomScorer(Scorer):
    """Uniform random scores from a generator seeded by ``seed`` and the layer index."""

    name: ClassVar[str] = "random"
    needs_attention: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + obs.layer_idx)
        return torch.rand(obs.key_positions.shape, generator=gen).to(obs.keys.device)
