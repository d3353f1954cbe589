"""Evict: keep the top-scoring rows of every segment, free the rest.

Protected rows (the recent window and the attention sinks) always stay. Kept rows stay in temporal order,
so "the last w rows" keeps meaning the most recent tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.actions.base import Action
from kvsqueeze.attention.observation import Observation
from kvsqueeze.cache.packed import PackedRows


class Evict(Action):
    """Free every row that was not chosen."""

    name: ClassVar[str] = "evict"

    def apply(
        self,
        rows: PackedRows,
        obs: Observation | None,
        scores: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        rows.keep(keep)


def protected_rows(
    key_positions: torch.Tensor,  # (B, H_kv, T)
    key_valid: torch.Tensor,  # (B, H_kv, T)
    recent: torch.Tensor,  # (B,) rows to keep at the end of each segment
    sinks: int,
) -> torch.Tensor:
    """(B, H_kv, T) bool: rows that no eviction may remove."""
    lengths = key_valid.sum(-1, keepdim=True)  # (B, H_kv, 1)
    t = torch.arange(key_valid.shape[-1], device=key_valid.device)
    from_end = lengths - 1 - t  # 0 for the last stored row
    keep = from_end < recent[:, None, None]
    if sinks > 0:
        keep |= key_positions < sinks
    return keep & key_valid


def select_rows(
    scores: torch.Tensor,  # (B, H_kv, T) fp32
    key_valid: torch.Tensor,  # (B, H_kv, T) bool
    protected: torch.Tensor,  # (B, H_kv, T) bool
    counts: torch.Tensor,  # (B, H_kv) rows to keep
) -> torch.Tensor:
    """Rows to keep per segment: protected rows first, then the highest scores.

    Returns a (B * H_kv, T) bool mask with ``min(count, stored rows)`` True entries per segment.
    """
    b, h, t = scores.shape
    counts = torch.minimum(counts, key_valid.sum(-1)).reshape(-1)  # (S,)
    ranked = scores.float().masked_fill(protected, float("inf")).masked_fill(~key_valid, float("-inf"))
    k = int(counts.max()) if counts.numel() else 0
    # best first; a stable sort breaks ties by storage order, so equal scores pick the same rows whatever
    # the padding around them (a batch keeps what its sequences keep one by one)
    top = ranked.reshape(b * h, t).sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (S, K)
    chosen = torch.arange(k, device=top.device)[None, :] < counts[:, None]  # (S, K)
    return torch.zeros(b * h, t, dtype=torch.bool, device=top.device).scatter_(1, top, chosen)
