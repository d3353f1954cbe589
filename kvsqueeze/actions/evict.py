"""Evict: keep the top-scoring rows of every segment, free the rest.

Protected rows (the recent window and the attention sinks) always stay. Kept rows are re-sorted into
temporal order, so "the last w rows" keeps meaning the most recent tokens.
"""

from __future__ import annotations

import torch


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to keep per segment: protected rows first, then the highest scores.

    Returns ``index`` (B * H_kv, K) long in ascending (temporal) order and ``counts`` (B * H_kv,), the
    number of leading entries of ``index`` each segment keeps.
    """
    b, h, t = scores.shape
    counts = torch.minimum(counts, key_valid.sum(-1)).reshape(-1)  # (S,)
    ranked = scores.float().masked_fill(protected, float("inf")).masked_fill(~key_valid, float("-inf"))
    k = int(counts.max()) if counts.numel() else 0
    top = ranked.reshape(b * h, t).topk(k, dim=-1).indices  # (S, K), best first
    beyond = torch.arange(k, device=top.device)[None, :] >= counts[:, None]
    index = top.masked_fill(beyond, t).sort(dim=-1).values  # slots past the count sort last
    return index, counts
