"""RoPE shift: move cached keys to other positions, exactly (spec B §3.0).

Hugging Face caches keys after RoPE. RoPE at position ``p`` turns each channel pair by ``p * inv_freq``,
so turning a key back by its own position gives the key before RoPE, and turning that forward by any new
position ``p'`` gives the key the model would have computed there (``RoPE(RoPE(x, p), d) = RoPE(x, p + d)``).
Values are never turned. The angles come from ``inv_freq`` (never from the model's cos/sin, which YaRN
scales), in fp32; :class:`~kvsqueeze.quantization.rope.KeyRotation` does the turning.

Keys here are stacked over layers, ``(L, H_kv, T, D)``, one sequence; ``positions`` is ``(T,)``.
"""

from __future__ import annotations

import torch

from kvsqueeze.quantization.rope import KeyRotation


def rotate_keys(
    keys: torch.Tensor,  # (L, H_kv, T, D)
    positions: torch.Tensor,  # (T,)
    rotations: list[KeyRotation],
    *,
    inverse: bool = False,
) -> torch.Tensor:
    """``keys`` turned by RoPE at ``positions`` in every layer (back to pre-RoPE with ``inverse``), fp32."""
    n_layers, heads, t, d = keys.shape
    if len(rotations) != n_layers:
        raise ValueError(f"{n_layers} layers of keys but {len(rotations)} RoPE rotations")
    if positions.shape != (t,):
        raise ValueError(f"positions must be ({t},), got {tuple(positions.shape)}")
    out = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    flat_positions = positions.repeat(heads)  # (H_kv * T,)
    for i, rotation in enumerate(rotations):
        rows = keys[i].reshape(heads * t, d)  # (H_kv * T, D)
        out[i] = rotation.rotate(rows, flat_positions, inverse=inverse).view(heads, t, d)
    return out


def shift_keys(
    keys: torch.Tensor,  # (L, H_kv, T, D) post-RoPE at positions `start + arange(T)`
    start: int,
    new_start: int,
    rotations: list[KeyRotation],
) -> torch.Tensor:
    """Post-RoPE keys of a contiguous run moved from ``start`` to ``new_start`` (a negative move is fine)."""
    delta = torch.full((keys.shape[2],), new_start - start, dtype=torch.long)
    return rotate_keys(keys, delta, rotations)
