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
        similarity = unit @ unit.transpose(1, 2)  # (S, T_e, T_c): evicted rows x kept rows
        similarity = similarity.masked_fill(~keep[:, None, :], float("-inf"))
        best, target = similarity.max(dim=-1)  # (S, T) u_e and c*(e)
        best = best.masked_fill(~evicted, 0.0)
        per_sequence = best.view(b, h, -1).sum(dim=(1, 2)) / evicted.view(b, h, -1).sum(dim=(1, 2)).clamp(
            min=1
        )
        if self.threshold is None:
            self.threshold = per_sequence
        else:
            self.threshold = self.alpha * self.threshold + self.beta * per_sequence
        merged = evicted & (best >= self.threshold.repeat_interleave(h)[:, None])  # (S, T)
        weight = (best * merged).unsqueeze(-1)  # (S, T, 1)
        index = target.masked_fill(~merged, 0).unsqueeze(-1)  # (S, T, 1)
        count = torch.zeros_like(best).scatter_add_(1, index[..., 0], merged.float())  # (S, T) n_c
        for name, data in (("keys", keys), ("values", values)):
            added = torch.zeros_like(data, dtype=torch.float32).scatter_add_(
                1, index.expand_as(data), weight * data.float()
            )
            rows.update_field(name, ((data.float() + added) / (1 + count[..., None])).to(data.dtype))
