"""Level vectors and EvoPress's level-switch mutation (Sieberling et al., ICML'25, arXiv 2410.14649).

A candidate gives every layer a level in ``1 .. max_level``; the levels sum to a fixed total, the budget.
Levels are equally spaced (a layer at level ``j`` keeps ``j`` steps of the budget), so one switch, raising
one layer by a step and lowering another by one, keeps the total exactly and no repair is needed.

Plain Python: no tensors, no model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LevelSpace:
    """The candidates: ``num_layers`` levels in ``1 .. max_level`` that sum to ``num_layers * start``.

    Args:
        num_layers: units the budget is split over (a model's layers).
        start: every layer's level in the uniform candidate (the budget, in steps per layer).
        max_level: the highest level a layer can take (a layer at ``max_level`` keeps everything).
    """

    num_layers: int
    start: int
    max_level: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"a level space needs at least one layer, got {self.num_layers}")
        if not 1 <= self.start <= self.max_level:
            raise ValueError(f"the start level must be in [1, {self.max_level}], got {self.start}")

    @property
    def total(self) -> int:
        """The sum every candidate's levels keep."""
        return self.num_layers * self.start

    def uniform(self) -> tuple[int, ...]:
        """The rule-of-thumb candidate: every layer at the same level."""
        return (self.start,) * self.num_layers

    def check(self, levels: tuple[int, ...]) -> None:
        """Raise ``ValueError`` unless ``levels`` is a candidate of this space."""
        if len(levels) != self.num_layers:
            raise ValueError(f"{len(levels)} levels for {self.num_layers} layers")
        if sum(levels) != self.total or not all(1 <= v <= self.max_level for v in levels):
            raise ValueError(f"levels must be in [1, {self.max_level}] and sum to {self.total}: {levels}")

    def mutate(self, parent: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        """``parent`` after ``k = min(U{1,3}, U{1,3})`` level switches (EvoPress: small k is likelier).

        A switch raises one layer by a level and lowers another by one, so the total stays exact. Returns
        ``parent`` unchanged only when no switch is possible (every layer at the same bound).
        """
        levels = list(parent)
        raised: set[int] = set()
        lowered: set[int] = set()  # a layer moves one way only, so switches never undo each other
        for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
            down = [i for i, v in enumerate(levels) if v > 1 and i not in raised]
            up = [
                i
                for i, v in enumerate(levels)
                if v < self.max_level and i not in lowered and any(j != i for j in down)
            ]
            if not up:
                break
            raise_at = rng.choice(up)
            lower_at = rng.choice([i for i in down if i != raise_at])
            levels[raise_at] += 1
            levels[lower_at] -= 1
            raised.add(raise_at)
            lowered.add(lower_at)
        return tuple(levels)
