"""Hadamard rotation of values before quantization (QuaRot, Ashkboos et al. 2024; SpinQuant).

A value row is quantized per token: one minimum and one step over its ``D`` channels, so a few large
channels set the step every other channel is rounded to. Multiplying the row by an orthonormal Hadamard
matrix ``H`` (``D x D``, entries ``+-1/sqrt(D)``) spreads each channel over all of them, so the row's range
shrinks towards its norm and every channel is resolved more finely. ``H`` is symmetric and its own inverse,
and attention is linear in the values, so the cache quantizes ``v @ H`` and attends over
``dequantize(...) @ H``. ``H`` is a constant of ``D`` (built once, like a weight), not stored per row.

Plain PyTorch: no transformers import.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def check_hadamard_dim(head_dim: int) -> None:
    """A one-line ``ValueError`` unless ``head_dim`` is a power of two (Sylvester's construction)."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"value_hadamard needs a power-of-two head dimension, got {head_dim}")


@lru_cache(maxsize=8)
def hadamard(head_dim: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix ``(D, D)`` fp32: symmetric, ``H @ H = I``."""
    check_hadamard_dim(head_dim)
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < head_dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(head_dim)


def rotate_values(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ H`` in fp32 for ``(N, D)`` rows; applying it twice gives the rows back."""
    return rows.float() @ hadamard(rows.shape[-1]).to(rows.device)
