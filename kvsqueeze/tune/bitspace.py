"""Bit widths per unit under a byte budget, and a mutation that never exceeds it (EvoPress, "none" grouping).

A candidate gives every unit (a layer's keys, a layer's values) a bit width from ``widths`` (2, 4, 8). A
unit at width ``b`` stores ``costs[unit][index of b]`` bytes, measured by the caller from the cache's own
storage (:func:`~kvsqueeze.quantization.budget.stored_bytes`), and a candidate's bytes, their sum, must stay
at or under ``budget``.

Why not :class:`~kvsqueeze.tune.levels.LevelSpace`'s budget-neutral switches: the steps of {2, 4, 8} do
not cost the same (2 -> 4 adds ``D / 4`` bytes of codes per token, 4 -> 8 twice that, and a split scheme's
parameters and low set shift the figures again), so raising one unit by a step and lowering another by a
step does not keep the total. A level space with equal-cost steps would need widths the packing lacks (3,
5, 6 bits). So the mutation is EvoPress's repair for heterogeneous costs: raise a unit one width, then lower
other units one width at a time, at random, until the total is back within the budget (a raise that fits
in the slack needs no lowering). The total is checked in whole bytes after every change, so a child is
never above the budget; it may end under it, and the search then prefers children that spend the slack.

Plain Python: no tensors, no model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvsqueeze.quantization.packing import SUPPORTED_BITS


@dataclass(frozen=True)
class BitSpace:
    """The candidates: a width from ``widths`` per unit, whose costs sum to at most ``budget`` bytes.

    Args:
        costs: per unit, its bytes at each of ``widths`` (non-decreasing).
        budget: the most bytes a candidate may store in all.
        widths: the bit widths a unit can take, increasing.
    """

    costs: tuple[tuple[int, ...], ...]
    budget: int
    widths: tuple[int, ...] = SUPPORTED_BITS

    def __post_init__(self) -> None:
        if not self.costs:
            raise ValueError("a bit space needs at least one unit")
        if list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"widths must increase, got {self.widths}")
        for row in self.costs:
            if len(row) != len(self.widths) or list(row) != sorted(row):
                raise ValueError(f"every unit needs a non-decreasing cost per width {self.widths}: {row}")
        lowest = sum(row[0] for row in self.costs)
        if lowest > self.budget:
            raise ValueError(
                f"the budget of {self.budget} bytes is under the {lowest} the lowest width needs"
            )

    def cost(self, bits: tuple[int, ...]) -> int:
        """Bytes a candidate stores."""
        return self._bytes([self.widths.index(b) for b in bits])

    def uniform(self) -> tuple[int, ...]:
        """The rule-of-thumb start: every unit at the highest width that fits them all, then, unit by unit in
        order, one width more wherever the budget still allows (the caller's unit order says who gets the
        slack first: keys before values, first layers first, for :func:`~kvsqueeze.tune.bits.bit_space`)."""
        units = len(self.costs)
        base = max(i for i in range(len(self.widths)) if self._bytes([i] * units) <= self.budget)
        levels = [base] * units
        if base + 1 < len(self.widths):
            for unit in range(units):
                levels[unit] += 1
                if self._bytes(levels) > self.budget:
                    levels[unit] -= 1
        return tuple(self.widths[v] for v in levels)

    def _bytes(self, levels: list[int]) -> int:
        return sum(row[v] for row, v in zip(self.costs, levels, strict=True))

    def check(self, bits: tuple[int, ...]) -> None:
        """Raise ``ValueError`` unless ``bits`` is a candidate of this space."""
        if len(bits) != len(self.costs) or not all(b in self.widths for b in bits):
            raise ValueError(f"{len(self.costs)} widths from {self.widths} expected, got {bits}")
        if self.cost(bits) > self.budget:
            raise ValueError(f"{bits} stores {self.cost(bits)} bytes, over the budget of {self.budget}")

    def mutate(self, parent: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        """``parent`` after ``k = min(U{1,3}, U{1,3})`` raises, each repaired to fit (see the module).

        A raised unit is never lowered in the same mutation, nor a lowered one raised. A raise that cannot
        be repaired (no other unit left to lower) is undone, so the result may be ``parent`` itself (the
        search skips such children).
        """
        top = len(self.widths) - 1
        levels = [self.widths.index(b) for b in parent]
        raised: set[int] = set()
        lowered: set[int] = set()
        for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
            up = [u for u, v in enumerate(levels) if v < top and u not in lowered]
            if not up:
                break
            trial, down_now = list(levels), set()
            unit = rng.choice(up)
            trial[unit] += 1
            while self._bytes(trial) > self.budget:
                down = [d for d, v in enumerate(trial) if v > 0 and d != unit and d not in raised]
                if not down:
                    break
                lower = rng.choice(down)
                trial[lower] -= 1
                down_now.add(lower)
            else:
                levels = trial
                raised.add(unit)
                lowered |= down_now
        return tuple(self.widths[v] for v in levels)
