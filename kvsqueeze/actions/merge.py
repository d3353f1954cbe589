"""Merge (D2O, Wan et al., ICLR'25): fold each evicted row into its most similar kept row.

Spec (reference/eviction-methods.md §3b), per sequence and KV head, for evicted rows ``E`` and kept rows
``C``: ``u_e = max_c cos(k_e, k_c)``, ``c*(e) = argmax``. The threshold is the mean of ``u`` at the first
compression, then an EMA ``tau <- alpha * tau + beta * mean(u)``. A row with ``u_e >= tau`` is merged:
``k_c <- (k_c + sum_{e->c} u_e k_e) / (1 + n_c)``, and the same for values with the key similarities as
weights; the others are dropped. Merged rows keep the kept row's position and score.

GQA: rows are chosen per KV head, so each head evicts its own rows and decides its own merges against
the shared threshold (the official code, which repeats KV heads, decides once per token over heads).
The threshold lives in this action, so a cache builds one per layer; it is per sequence.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.actions.base import Action
from kvsqueeze.attention.observation import Observation
from kvsqueeze.cache.packed import PackedRows


class Merge(Action):
    """Evict, folding each evicted row into its most similar kept row when similar enough."""

    name: ClassVar[str] = "merge"

    def __init__(self, alpha: float = 0.5, beta: float = 0.5) -> None:
        self.alpha, self.beta = alpha, beta
        self.threshold: torch.Tensor | None = None  # (B,) the EMA of mean similarities

    def select_batch(self, indices: torch.Tensor) -> None:
        if self.threshold is not None:
            self.threshold = self.threshold[indices]

    def apply(
        self,
        rows: PackedRows,
        obs: Observation | None,
        scores: torch.Tensor,  # (B, H_kv, T)
        keep: torch.Tensor,  # (B * H_kv, T)
    ) -> None:
        b, h, t = scores.shape
        valid = rows.valid_mask()  # (S, T)
        evicted = valid & ~keep
        if bool(evicted.any()):
            self._merge(rows, keep, evicted, b, h)
        rows.keep(keep)

    def _merge(self, rows: PackedRows, keep: torch.Tensor, evicted: torch.Tensor, b: int, h: int) -> None:
        keys = rows.padded("keys")  # (S, T, D)
        values = rows.padded("values")
        unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp(min=1e-6)
        # only the evicted rows are compared (one per segment while decoding): (S, E) slots
        e = int(evicted.sum(1).max())
        slots = evicted.float().topk(e, dim=1).indices  # (S, E) indices of evicted rows (padded)
        is_evicted = evicted.gather(1, slots)  # (S, E)
        picked = unit.gather(1, slots[..., None].expand(-1, -1, unit.shape[-1]))  # (S, E, D)
        similarity = (picked @ unit.transpose(1, 2)).masked_fill(
            ~keep[:, None, :], float("-inf")
        )  # (S, E, T)
        best, target = similarity.max(dim=-1)  # (S, E) u_e and c*(e)
        best = best.masked_fill(~is_evicted, 0.0)
        mean = best.view(b, -1).sum(-1) / is_evicted.view(b, -1).sum(-1).clamp(min=1)  # (B,)
        self.threshold = mean if self.threshold is None else self.alpha * self.threshold + self.beta * mean
        merged = is_evicted & (best >= self.threshold.repeat_interleave(h)[:, None])  # (S, E)
        if not bool(merged.any()):
            return
        weight = (best * merged).unsqueeze(-1)  # (S, E, 1)
        target = target.masked_fill(~merged, 0)  # (S, E)
        count = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
        count.scatter_add_(1, target, merged.float())  # (S, T) n_c
        for name, data in (("keys", keys), ("values", values)):
            source = data.float().gather(1, slots[..., None].expand(-1, -1, data.shape[-1]))  # (S, E, D)
            added = torch.zeros_like(data, dtype=torch.float32)
            added.scatter_add_(1, target[..., None].expand_as(source), weight * source)
            rows.update_field(name, ((data.float() + added) / (1 + count[..., None])).to(data.dtype))
