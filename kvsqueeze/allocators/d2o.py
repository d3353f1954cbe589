"""D2O's layer budgets (Wan et al., ICLR'25): layers with denser attention keep more.

Spec (reference/eviction-methods.md §3b-c), per sequence, from each layer's prompt column sums
``c_h(j) = sum_i A_h[i, j]`` (per query head, computed in query chunks):

* ``v_h = Var_j c_h(j)``, min-max normalized across heads (``+1e-6``), ``sigma_l = mean_h``;
* ``w_l = softmax_l(-sigma_l)``, ``R_l = clamp(N * rho * w_l, 0.01, 1)`` with ``rho`` the kept fraction
  (``hh_ratio + recent_ratio`` of the paper; here the budget over the prompt length);
* layer ``l`` keeps ``floor((L + 1) * R_l)`` rows (heavy and recent halves are split by the method's
  ``recent_share``). The ``L + 1`` is because the official code compresses at the first decode step.

Clamping breaks exact conservation: the total is only about ``N * rho * L``. ``protect_layers`` lists
layers that keep everything (the official code never compresses layers 0, 1 and N - 1; off by default).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest
from kvsqueeze.attention.observation import Observation


class D2OAllocator(Allocator):
    """Softmax of negative attention variance over layers, planned when the last layer has prefilled."""

    name: ClassVar[str] = "d2o"
    uses_statistics: ClassVar[bool] = True

    def __init__(self, protect_layers: tuple[int, ...] = ()) -> None:
        self.protect_layers = tuple(protect_layers)

    def layer_statistic(self, obs: Observation, scores: torch.Tensor) -> torch.Tensor:
        """``sigma_l`` per sequence, (B,): mean over query heads of the min-max normalized variance of
        each head's column sums. Per query head, as the official code: with few KV heads (2 in
        Qwen2.5-0.5B) a min-max over KV heads would always average to 0.5."""
        sums = obs.column_sums().flatten(1, 2)  # (B, H, T): the same walk as the accumulated scores
        valid = obs.key_valid[:, :1].expand_as(sums)  # the prompt's rows are the same for every head
        count = valid.sum(-1).clamp(min=2)
        mean = (sums * valid).sum(-1) / count
        variance = (((sums - mean[..., None]) * valid) ** 2).sum(-1) / (count - 1)  # (B, H)
        low, high = variance.amin(-1, keepdim=True), variance.amax(-1, keepdim=True)
        return ((variance - low) / (high - low + 1e-6)).mean(-1)

    def plan(self, statistics: list[torch.Tensor], request: LayerRequest) -> dict[int, torch.Tensor]:
        n = request.num_layers
        if request.layer_idx < n - 1:
            return {}
        sigma = torch.stack(statistics).double()  # (N, B)
        weights = torch.softmax(-sigma, dim=0)
        lengths = request.prompt_lengths.double()  # (B,)
        rho = (request.budget.double() / lengths).clamp(max=1.0)
        share = (n * rho[None, :] * weights).clamp(0.01, 1.0)  # (N, B) R_l
        budgets = torch.floor((lengths[None, :] + 1) * share).long()
        budgets = torch.maximum(budgets, torch.ones_like(budgets))
        for layer in self.protect_layers:
            budgets[layer % n] = request.prompt_lengths + 1
        fits = request.prompt_lengths <= request.budget  # nothing to compress: keep the budget
        budgets[:, fits] = request.budget[fits]
        return {layer: budgets[layer] for layer in range(n)}
