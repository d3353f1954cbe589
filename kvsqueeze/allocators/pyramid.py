"""Pyramid allocator (PyramidKV, Cai et al., COLM'25): budgets fall linearly with depth.

Spec (reference/eviction-methods.md §7), with ``k = C - w`` the average non-window budget:
``min = floor(k / beta)``, ``max = 2k - min``; if ``max >= L - w`` then ``max = L - w`` and
``min = 2k - max``; ``step = floor((max - min) / (N - 1))``; layer ``l`` keeps ``max - l * step`` plus the
window. No compression when ``L < C``; the uniform ``k`` when ``L < 2k``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest


class PyramidAllocator(Allocator):
    """Linearly decreasing per-layer budgets with ratio ``beta`` between the extremes."""

    name: ClassVar[str] = "pyramid"

    def __init__(self, beta: float = 20.0) -> None:
        if beta < 1:
            raise ValueError(f"pyramid beta must be >= 1, got {beta}")
        self.beta = beta

    def layer_budget(self, request: LayerRequest) -> torch.Tensor:
        out = []
        for c, length in zip(request.budget.tolist(), request.prompt_lengths.tolist(), strict=True):
            out.append(self._one(int(c), int(length), request))
        return torch.tensor(out, dtype=torch.long, device=request.budget.device)

    def _one(self, capacity: int, length: int, request: LayerRequest) -> int:
        w, n, layer = request.window, request.num_layers, request.layer_idx
        if length < capacity:
            return capacity
        k = capacity - w
        if length < 2 * k or n == 1:
            return capacity
        low = int(k // self.beta)
        high = 2 * k - low
        if high >= length - w:
            high = length - w
            low = 2 * k - high
        step = (high - low) // (n - 1)
        return high - layer * step + w
