"""PrefixKV's layer budgets (Wang et al., NeurIPS'25): one global prefix level found by bisection.

Spec (reference/eviction-methods.md §4b-c), per sequence of ``L`` prompt tokens. Each layer sorts its
importance scores in descending order, normalizes them to sum 1 and forms the cumulative sum ``C_l``.
For a level ``p``: ``n_l(p) = #{k : C_l(k) < p}`` and ``forget_l(p) = max(0, L - n_l(p) - 1 - 5)``
(4 sinks and the last token are protected). Bisection on ``p`` in [0, 1] (at most 50 steps) makes
``F(p) = sum_l forget_l(p)`` reach ``T = r * N * L`` within 5 tokens, ``r`` the evicted fraction
(1 - budget / L); then ``forget_l <- int(forget_l * T / F)`` and layer ``l`` keeps ``L - forget_l``.
Planned once, when the last layer has prefilled. After the prompt, each forward call deletes at most one
row per layer and head, however many tokens it carries, while the layer holds more than
``(1 - r_l) * tokens seen`` rows: the official hook (THU-MIG/PrefixKV, ``prefixkv.py``, called after each
forward) deletes one row per call. A multi-token call (a chat template's end and an answer prefix) grows
the cache by the rest, and the following one-token steps delete one row each while adding one, until the
layer is back at its rate.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest
from kvsqueeze.attention.observation import Observation

PROTECTED = 5  # 4 sinks and the last prompt token


def forget_counts(cumulative: torch.Tensor, lengths: torch.Tensor, p: float) -> torch.Tensor:
    """``forget_l(p)`` for every layer, (N,), from cumulative importances (N, T) of one sequence."""
    below = (cumulative < p).sum(-1)  # (N,) n_l(p), a left searchsorted
    return (lengths - below - 1 - PROTECTED).clamp(min=0)


def bisect_forget(
    cumulative: torch.Tensor, length: int, target: float, tolerance: int = 5, max_steps: int = 50
) -> list[int]:
    """Per-layer rows to forget (N,) whose total is ``target``: PrefixKV's bisection, then rescaling."""
    lengths = torch.full((cumulative.shape[0],), length)
    low, high = 0.0, 1.0
    forget = forget_counts(cumulative, lengths, 0.5)
    for _ in range(max_steps):
        mid = (low + high) / 2
        forget = forget_counts(cumulative, lengths, mid)
        total = int(forget.sum())
        if abs(total - target) < tolerance:
            break
        if total < target:
            high = mid
        else:
            low = mid
    total = int(forget.sum())
    if total == 0:
        return forget.tolist()
    return [int(f * target / total) for f in forget.tolist()]


class PrefixAllocator(Allocator):
    """One cumulative-importance level for every layer, found by bisection at the last layer."""

    name: ClassVar[str] = "prefix"
    uses_statistics: ClassVar[bool] = True

    def __init__(self, tolerance: int = 5, max_steps: int = 50) -> None:
        self.tolerance, self.max_steps = tolerance, max_steps

    def layer_statistic(self, obs: Observation, scores: torch.Tensor) -> torch.Tensor:
        """Cumulative normalized importance, sorted descending, over the real rows (B, T) (head 0: shared)."""
        importance = scores[:, 0].masked_fill(~obs.key_valid[:, 0], 0.0).clamp(min=0)  # (B, T)
        ordered = importance.sort(dim=-1, descending=True).values
        total = ordered.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        cumulative = ordered.cumsum(-1) / total
        # padding slots sort last; give them 2.0 so no level p <= 1 counts them
        return cumulative.masked_fill(~obs.key_valid[:, 0].sort(dim=-1, descending=True).values, 2.0)

    def plan(self, statistics: list[torch.Tensor], request: LayerRequest) -> dict[int, torch.Tensor]:
        if request.layer_idx < request.num_layers - 1:
            return {}
        n = request.num_layers
        columns = []
        for b, (capacity, length) in enumerate(
            zip(request.budget.tolist(), request.prompt_lengths.tolist(), strict=True)
        ):
            if length <= capacity:
                columns.append([int(capacity)] * n)
                continue
            evicted = 1 - capacity / length
            width = max(s.shape[-1] for s in statistics)  # sliding-window layers hold fewer rows
            cumulative = torch.stack(
                [torch.nn.functional.pad(s[b], (0, width - s.shape[-1]), value=2.0) for s in statistics]
            )  # (N, T)
            forget = bisect_forget(
                cumulative, int(length), evicted * n * length, self.tolerance, self.max_steps
            )
            columns.append([int(length) - f for f in forget])
        budgets = torch.tensor(columns, dtype=torch.long, device=request.budget.device).T  # (N, B)
        return {layer: budgets[layer] for layer in range(n)}

    def decode_budget(
        self,
        prefill_budget: torch.Tensor,
        prompt_lengths: torch.Tensor,
        tokens_seen: torch.Tensor,
        stored: torch.Tensor,
    ) -> torch.Tensor:
        """``(1 - r_l) * tokens seen``, the rate the layer kept the prompt at, but one deletion per call:
        never below ``stored - 1``."""
        rate = torch.div(prefill_budget * tokens_seen, prompt_lengths.clamp(min=1), rounding_mode="floor")
        return torch.maximum(rate, stored - 1)
