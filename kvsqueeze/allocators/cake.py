"""CAKE's layer budgets (Qin et al., ICLR'25): layer preference from attention dispersion and shift.

Spec (reference/eviction-methods.md §2b-c). From the window attention ``P`` of the last ``w`` queries
restricted to the prefix keys (not renormalized), per sequence:

* dispersion ``H_l = -sum P log(P + 1e-10)`` and shift ``V_l = sum_j Var_i P[i, j]`` (unbiased, over the
  window queries), both summed over heads;
* preference ``P_l = H_l^(1/tau1) * V_l^(1/tau2)``;
* with ``T = N * (C - w)`` the total non-window budget (``C`` the average per-layer budget, window
  included), layer ``l`` gets ``P_l / sum P * T`` rows plus the window, through ``adjust_budgets``
  (truncate, cap at ``L - w``, spread the excess over uncapped layers, repair the total).

Cascading: after layer ``m`` has prefilled, every layer ``l <= m`` is re-sized to
``P_l / sum_{k<=m} P_k * T``, so budgets only shrink and the cache never holds much more than ``T`` rows
(plus the layer being prefilled). The final allocation equals planning once at the last layer, up to
rounding. As in the official code, a prompt with ``L <= C + w`` is not compressed; its layers then
decode within ``max(L, C)`` rows.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest
from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.cake_indicator import mean_and_variance, window_probabilities


def adjust_budgets(shares: list[float], cap: int, total: int) -> list[int]:
    """Integer budgets from real-valued shares: truncate, cap at ``cap``, spread what the capped layers
    could not take evenly over the others (remainder to the first), then fix the total with +-1 steps."""
    budgets = [min(int(s), cap) for s in shares]
    excess = sum(max(0, int(s) - cap) for s in shares)
    while excess > 0:
        free = [i for i, b in enumerate(budgets) if b < cap]
        if not free:
            break
        each, rest = divmod(excess, len(free))
        excess = 0
        for k, i in enumerate(free):
            wanted = budgets[i] + each + (1 if k < rest else 0)
            budgets[i] = min(cap, wanted)
            excess += wanted - budgets[i]
    target = min(total, cap * len(budgets))
    i = 0
    while sum(budgets) != target:
        step = 1 if sum(budgets) < target else -1
        if 0 <= budgets[i] + step <= cap:
            budgets[i] += step
        i = (i + 1) % len(budgets)
    return budgets


class CakeAllocator(Allocator):
    """Budgets proportional to each layer's preference, re-planned after every layer (cascading)."""

    name: ClassVar[str] = "cake"
    uses_statistics: ClassVar[bool] = True

    def __init__(self, window: int = 32, tau1: float = 1.0, tau2: float = 1.0, cascade: bool = True) -> None:
        if tau1 <= 0 or tau2 <= 0:
            raise ValueError(f"cake temperatures must be > 0, got tau1={tau1}, tau2={tau2}")
        self.window, self.tau1, self.tau2, self.cascade = window, tau1, tau2, cascade

    def layer_statistic(self, obs: Observation, scores: torch.Tensor) -> torch.Tensor:
        """The layer's preference ``H^(1/tau1) * V^(1/tau2)`` per sequence, (B,) fp32."""
        probs, count = window_probabilities(obs, self.window)  # (B, H_kv, g, w, T)
        first = obs.query_positions[:, obs.last_queries(self.window)]  # (B,) first window query
        prefix = obs.key_valid & (obs.key_positions < first[:, None, None])  # (B, H_kv, T)
        probs = probs * prefix[:, :, None, None, :]
        dispersion = -(probs * torch.log(probs + 1e-10)).sum(dim=(1, 2, 3, 4))  # (B,)
        _, variance = mean_and_variance(probs, count)  # (B, H_kv, g, T)
        shift = (variance * prefix[:, :, None, :]).sum(dim=(1, 2, 3))  # (B,)
        return dispersion.clamp(min=0) ** (1 / self.tau1) * shift.clamp(min=0) ** (1 / self.tau2)

    def plan(self, statistics: list[torch.Tensor], request: LayerRequest) -> dict[int, torch.Tensor]:
        last = request.layer_idx
        if not self.cascade and last < request.num_layers - 1:
            return {}
        preference = torch.stack(statistics).double()  # (m + 1, B)
        w = request.window
        columns = []
        for b, (capacity, length) in enumerate(
            zip(request.budget.tolist(), request.prompt_lengths.tolist(), strict=True)
        ):
            if length <= capacity + w:  # not compressed; decoding keeps each layer at the larger of the two
                columns.append([int(max(length, capacity))] * (last + 1))
                continue
            total = request.num_layers * (int(capacity) - w)
            weights = preference[:, b]
            shares = (
                (weights / weights.sum() * total).tolist()
                if weights.sum() > 0
                else [total / (last + 1)] * (last + 1)
            )
            columns.append([n + w for n in adjust_budgets(shares, int(length) - w, total)])
        budgets = torch.tensor(columns, dtype=torch.long, device=request.budget.device).T  # (m + 1, B)
        return {layer: budgets[layer] for layer in range(last + 1)}
