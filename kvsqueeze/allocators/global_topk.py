"""One top-k over every layer and KV head at once (KVzip's selection, Kim et al., 2025).

KVzip scores rows on one scale across the whole model (the attention the context's replay pays them), so it
ranks all of a sequence's rows together and keeps the best ``budget x layers x KV heads``: layers and heads
that matter get more rows, the rest fewer. Each layer records its scores on the prompt; the last layer plans
every layer at once, so nothing is evicted until all scores are in. Counts include the protected rows
(sinks, a recent window), which always stay and are charged to the budget.

Plain tensors only.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest
from kvsqueeze.attention.observation import Observation


class GlobalTopK(Allocator):
    """Per sequence, the top ``sum_l sum_h min(budget, rows_lh)`` scores over all layers and KV heads.

    Args:
        sinks: rows at positions below ``sinks`` always stay.
        window: the last ``window`` rows of every (sequence, head) always stay.
        floor: every (layer, head) first keeps its best rows up to this share of the average budget (when
            they and the protected rows fit it), then the rest is ranked globally; 0 is KVzip's plain top-k.
    """

    name: ClassVar[str] = "global_topk"
    uses_statistics: ClassVar[bool] = True

    def __init__(self, sinks: int = 4, window: int = 0, floor: float = 0.0) -> None:
        if sinks < 0 or window < 0:
            raise ValueError(f"global_topk: sinks and window must be >= 0, got {sinks} and {window}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"global_topk: floor must be in [0, 1], got {floor}")
        self.sinks, self.window, self.floor = sinks, window, floor

    def layer_statistic(self, obs: Observation, scores: torch.Tensor) -> torch.Tensor:
        """The layer's scores ranked for selection, (B, H_kv, T): protected rows +inf, empty slots -inf."""
        valid = obs.key_valid
        from_end = valid.sum(-1, keepdim=True) - 1 - torch.arange(valid.shape[-1], device=valid.device)
        protected = (from_end < self.window) | (obs.key_positions < self.sinks)
        ranked = scores.float().masked_fill(protected, float("inf"))
        return ranked.masked_fill(~valid, float("-inf"))

    def plan(self, statistics: list[torch.Tensor], request: LayerRequest) -> dict[int, torch.Tensor]:
        """Nothing until the last layer; then rows per (sequence, KV head), (B, H_kv), for every layer."""
        if request.layer_idx < request.num_layers - 1:
            return {}
        return dict(enumerate(global_counts(statistics, request.budget, self.floor)))


def global_counts(ranked: list[torch.Tensor], budget: torch.Tensor, floor: float = 0.0) -> list[torch.Tensor]:
    """Rows each (sequence, KV head) of each layer keeps under one top-k per sequence.

    ``ranked`` holds each layer's (B, H_kv, T_l) scores (-inf for empty slots, +inf for protected rows);
    ``budget`` (B,) is the average rows per head per layer. A sequence keeps
    ``sum over layers and heads of min(budget, rows)`` rows in all: a head shorter than the budget (a
    sliding-window layer, a short prompt) is not charged for rows it never held. ``floor`` > 0: each head's
    best ``floor x budget`` rows rank before every other unprotected row.
    """
    b = ranked[0].shape[0]
    if floor > 0:  # lifted above every other unprotected row of any layer
        finite = torch.cat([r[torch.isfinite(r)] for r in ranked])
        lift = float(finite.max() - finite.min()) + 1.0 if finite.numel() else 0.0
        ranked = [_lift_best(r, (floor * budget).long(), lift) for r in ranked]
    stored = [(r > float("-inf")).sum(-1) for r in ranked]  # (B, H_kv) per layer
    totals = sum(s.clamp(max=budget[:, None]).sum(-1) for s in stored)  # (B,)
    flat = torch.cat([r.reshape(b, -1) for r in ranked], dim=1)  # (B, sum_l H_kv * T_l)
    widths = torch.tensor([r.shape[2] for r in ranked for _ in range(r.shape[1])], device=flat.device)
    owner = torch.arange(len(widths), device=flat.device).repeat_interleave(widths)  # (layer, head) of a slot
    counts = torch.zeros(b, len(widths), dtype=torch.long, device=flat.device)
    for i in range(b):
        top = flat[i].sort(descending=True, stable=True).indices[: int(totals[i])]  # ties: storage order
        counts[i] = torch.bincount(owner[top], minlength=len(widths))
    return list(counts.split([r.shape[1] for r in ranked], dim=1))


def _lift_best(ranked: torch.Tensor, rows: torch.Tensor, lift: float) -> torch.Tensor:
    """``ranked`` (B, H_kv, T) with each head's best ``rows`` (B,) finite scores raised by ``lift``;
    protected (+inf) and empty (-inf) slots unchanged."""
    finite = torch.isfinite(ranked)
    order = ranked.masked_fill(~finite, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(ranked.shape[-1], device=order.device).expand_as(order)
    )
    return torch.where(finite & (rank < rows[:, None, None]), ranked + lift, ranked)
