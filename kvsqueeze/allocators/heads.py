"""Head allocators: how one layer's budget splits over its KV heads.

A layer allocator (uniform, pyramid) says how many rows a layer keeps per sequence; a head allocator then
says how many of them each KV head keeps, looking at the scores. Heads may end up with different numbers
of rows: the cache stores them ragged (:class:`~kvsqueeze.cache.packed.PackedRows`), so the memory of a
short head is really freed and attention over the kept rows stays exact.

Counts include the protected rows (window and sinks); plain tensors only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class HeadAllocator(ABC):
    """Base class: subclasses implement :meth:`head_counts`."""

    name: ClassVar[str] = "heads"
    #: True if the allocator may drop rows even when a layer is within its budget (it sets its own size).
    sizes_itself: ClassVar[bool] = False

    @abstractmethod
    def head_counts(
        self,
        scores: torch.Tensor,  # (B, H_kv, T) fp32, higher = keep
        candidates: torch.Tensor,  # (B, H_kv, T) bool: stored rows that may be evicted
        protected: torch.Tensor,  # (B, H_kv, T) bool: stored rows that always stay
        layer_budget: torch.Tensor,  # (B,) rows per head this layer keeps on average, protected included
    ) -> torch.Tensor:
        """Rows each KV head keeps, (B, H_kv) long, protected rows included."""


class UniformHeads(HeadAllocator):
    """Every KV head of a layer keeps the layer's budget."""

    name: ClassVar[str] = "uniform"

    def head_counts(self, scores, candidates, protected, layer_budget):
        return layer_budget[:, None].expand(scores.shape[:2]).clone()


class AdaKVHeads(HeadAllocator):
    """Ada-KV (Feng et al., NeurIPS'25): a global top-k over all heads of a layer, with a floor per head.

    Spec (reference/eviction-methods.md §8), per sequence with ``B'`` the layer's non-protected budget per
    head: take the top ``H_kv * B'`` candidate scores across all heads, count ``c_h`` per head, and give
    head ``h`` ``b_h = round((1 - alpha) * c_h + floor(alpha * B'))`` rows plus its protected rows. The floor
    (``alpha``, the "safeguard") keeps any head from being emptied; the maintainers advise ``alpha >= 0.05``.
    """

    name: ClassVar[str] = "adakv"

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"adakv alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def head_counts(self, scores, candidates, protected, layer_budget):
        b, h, t = scores.shape
        n_protected = protected.sum(-1)  # (B, H_kv)
        base = (layer_budget[:, None] - n_protected).clamp(min=0).amax(-1)  # (B,) B' per head
        ranked = scores.float().masked_fill(~candidates, float("-inf")).reshape(b, h * t)
        counts = torch.zeros(b, h, dtype=torch.long, device=scores.device)
        for i in range(b):  # sequences differ in budget; the loop runs once per sequence, not per row
            k = min(int(base[i]) * h, int(candidates[i].sum()))
            top = ranked[i].topk(k).indices // t  # head of each globally selected row
            chosen = torch.bincount(top, minlength=h)  # (H_kv,) c_h
            floor = math.floor(self.alpha * int(base[i]))
            counts[i] = torch.round((1 - self.alpha) * chosen.float() + floor).long()
        return counts + n_protected


class MassHeads(HeadAllocator):
    """Keep, per head, the fewest rows whose normalized scores cover a mass ``p`` (top-p), under a cap.

    After FTWT's heat-map mass and top-p expert routing: a head whose attention is concentrated keeps a
    few rows, a diffuse head keeps many. Scores are clamped at 0 and normalized over each head's candidate
    rows; ``p = 1`` keeps every candidate. The layer budget is the cap (a budget of 1.0 means no cap), so
    the effective ratio is what the prompt needs, at most the budget; see
    :meth:`~kvsqueeze.cache.SqueezeCache.kept_ratio`.
    """

    name: ClassVar[str] = "mass"
    sizes_itself: ClassVar[bool] = True

    def __init__(self, p: float = 0.9) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"mass p must be in (0, 1], got {p}")
        self.p = p

    def head_counts(self, scores, candidates, protected, layer_budget):
        n_candidates = candidates.sum(-1)  # (B, H_kv)
        if self.p >= 1:
            needed = n_candidates
        else:
            mass = scores.float().clamp(min=0).masked_fill(~candidates, 0.0)
            ordered = mass.sort(dim=-1, descending=True).values  # (B, H_kv, T)
            total = ordered.sum(-1, keepdim=True)
            covered = ordered.cumsum(-1) / total.clamp(min=torch.finfo(torch.float32).tiny)
            # fewest rows whose mass reaches p: one more than the rows still below p
            needed = ((covered < self.p).sum(-1) + 1).minimum(n_candidates)
            needed = torch.where(total[..., 0] > 0, needed, n_candidates)  # no signal: keep them all
        counts = needed + protected.sum(-1)
        return counts.minimum(layer_budget[:, None])


class ThresholdHeads(HeadAllocator):
    """Keep the rows whose score reaches ``threshold`` (MPCache's static tau), under the layer's cap.

    Protected rows stay whatever their score. A scorer that gives every KV head the same scores (MPCache's
    head mean) makes every head keep the same rows.
    """

    name: ClassVar[str] = "threshold"
    sizes_itself: ClassVar[bool] = True

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def head_counts(self, scores, candidates, protected, layer_budget):
        reached = ((scores.float() >= self.threshold) & candidates).sum(-1)  # (B, H_kv)
        return (reached + protected.sum(-1)).minimum(layer_budget[:, None])
