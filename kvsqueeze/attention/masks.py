"""SDPA masks built from absolute positions: causal, padding and sliding window in one rule.

A query at position p may attend to a stored key at position k iff the key is valid, ``k <= p``, and, on a
sliding-window layer, ``k > p - window``. Where stock SDPA behaviour is already exact (one query over a
fully visible cache, or a fresh causal prefill) no mask is built at all.
"""

from __future__ import annotations

import torch

from kvsqueeze.attention.observation import Observation


def attention_mask_for(obs: Observation) -> torch.Tensor | None:
    """The SDPA mask for an observation, or ``None`` when SDPA's own (causal) behaviour is exact.

    Returns a bool mask (B, 1 or H, q, T), True = attend.
    """
    b, hk, t = obs.key_valid.shape
    q = obs.query_length
    if q == 1:
        if obs.sliding_window is None and obs.all_keys_valid:
            return None  # every stored row is in this token's past
        visible = obs.visibility()  # (B, H_kv, 1, T): cheap for one query
        if bool(visible.all()):
            return None
        return visible.repeat_interleave(obs.group_size, dim=1)
    fresh = q == t and obs.all_keys_valid and bool(obs.query_valid.all())
    window_is_moot = obs.sliding_window is None or t <= obs.sliding_window
    if fresh and window_is_moot and _is_arange(obs.query_positions, obs.key_positions):
        return None  # a fresh prefill: SDPA's causal mask is the same, and faster
    same_heads = hk == 1 or (
        bool((obs.key_positions == obs.key_positions[:, :1]).all())
        and bool((obs.key_valid == obs.key_valid[:, :1]).all())
    )
    if same_heads:
        visible = obs.visibility(first_head_only=True)  # (B, 1, q, T)
    else:
        visible = obs.visibility().repeat_interleave(obs.group_size, dim=1)  # (B, H, q, T)
    # A padding query sees nothing; give it every valid key so SDPA stays finite (its output is unused).
    empty = ~visible.any(-1, keepdim=True)
    if bool(empty.any()):
        valid = obs.key_valid[:, :1] if same_heads else obs.key_valid.repeat_interleave(obs.group_size, dim=1)
        visible = visible | (empty & valid[:, :, None, :])
    return visible


def _is_arange(query_positions: torch.Tensor, key_positions: torch.Tensor) -> bool:
    """True when queries and keys are the same fresh run of positions (no cached past)."""
    return bool((query_positions[:, None, :] == key_positions).all())
