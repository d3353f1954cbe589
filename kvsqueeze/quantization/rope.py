"""Pre-RoPE key quantization: turn cached keys back to the frame before RoPE, quantize them there.

Hugging Face caches keys after RoPE. A key channel often carries a large, nearly constant offset (Qwen2's
``k_proj`` bias, for one); RoPE turns each channel pair ``(j, j + R/2)`` by ``position * inv_freq[j]``, so
over thousands of tokens that offset sweeps both channels of a fast pair through ``[-|offset|, |offset|]``
and a per-channel range (KIVI's, ZipCache's) is far wider than the content it has to resolve. Before RoPE
the offset stays put and the range covers the content alone (KVQuant, Hooper et al. 2024).

:class:`KeyRotation` is RoPE's rotation as an invertible map of ``(N, D)`` rows given their positions.
The cache stores ``rotate(keys, positions, inverse=True)`` quantized and rotates the dequantized rows
forward again for attention. The two directions are exact inverses for any frequencies (each pair turns by
``+angle`` then ``-angle``), so a frequency that does not match the model's (dynamic NTK, interleaved
pairs) costs accuracy, never correctness. Scaled RoPE variants (YaRN's ``attention_scaling``) multiply
both channels of a pair by one factor, which rotating back and forth without it leaves in place.

Plain PyTorch: no transformers import (:func:`key_rotations` imports it for RoPE types other than default).
"""

from __future__ import annotations

from typing import Any

import torch

from kvsqueeze.text_config import head_dim_of, layer_types_of


class KeyRotation:
    """RoPE's rotation (rotate-half pairing) of the first ``2 * len(inv_freq)`` channels of a head.

    Args:
        inv_freq: ``(R / 2,)`` the angle per position of each channel pair ``(j, j + R / 2)``.
        head_dim: channels per head ``D``; channels from ``R`` on are not rotated (partial rotary).
    """

    def __init__(self, inv_freq: torch.Tensor, head_dim: int) -> None:
        rotary = 2 * inv_freq.numel()
        if rotary == 0 or rotary > head_dim:
            raise ValueError(f"RoPE rotates {rotary} channels; a head has {head_dim}")
        self.inv_freq = inv_freq.detach().float().cpu()  # (R / 2,)
        self.head_dim = head_dim

    @classmethod
    def from_theta(cls, theta: float, head_dim: int, rotary_dim: int | None = None) -> KeyRotation:
        """Plain RoPE of base ``theta`` over the first ``rotary_dim`` channels (default: all of them)."""
        dim = head_dim if rotary_dim is None else rotary_dim
        return cls(1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), head_dim)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def rotate(self, rows: torch.Tensor, positions: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """``rows`` ``(N, D)`` turned by RoPE at ``positions`` ``(N,)`` (back to pre-RoPE with ``inverse``),
        fp32. The angle is ``position * inv_freq`` in fp32, as the models compute it."""
        angle = positions.float()[:, None] * self.inv_freq.to(rows.device)  # (N, R / 2)
        cos, sin = angle.cos(), angle.sin()
        if inverse:
            sin = -sin
        rows = rows.float()
        half = self.rotary_dim // 2
        first, second = rows[:, :half], rows[:, half : 2 * half]  # (N, R / 2) each
        turned = (first * cos - second * sin, second * cos + first * sin)
        return torch.cat([*turned, rows[:, 2 * half :]], dim=-1)

    def __repr__(self) -> str:
        return f"KeyRotation(rotary_dim={self.rotary_dim}, head_dim={self.head_dim})"


def key_rotations(config: Any) -> list[KeyRotation]:
    """One :class:`KeyRotation` per layer of a decoder ``config`` (transformers' ``rope_parameters``; a
    model with a RoPE per layer type, as Gemma 3, gets each layer its own). A one-line ``ValueError`` for a
    config without RoPE."""
    head_dim = head_dim_of(config)
    parameters = getattr(config, "rope_parameters", None) or {}
    layer_types = layer_types_of(config)
    by_type: dict[str, KeyRotation] = {}
    for layer_type in dict.fromkeys(layer_types):
        params = parameters.get(layer_type, parameters)  # per layer type (Gemma 3) or one for all
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(config, "rope_theta", None))
            if theta is None:
                raise ValueError(f"key_pre_rope needs a RoPE model; {config.model_type!r} has no rope_theta")
            factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
            by_type[layer_type] = KeyRotation.from_theta(theta, head_dim, int(head_dim * factor))
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            layer_arg = {"layer_type": layer_type} if layer_type in parameters else {}
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, **layer_arg)
            by_type[layer_type] = KeyRotation(inv_freq, head_dim)
    return [by_type[layer_type] for layer_type in layer_types]
