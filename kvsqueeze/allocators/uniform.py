"""Uniform allocator: every layer and head keeps the same number of rows."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest


class UniformAllocator(Allocator):
    """Each layer keeps the average budget."""

    name: ClassVar[str] = "uniform"

    def layer_budget(self, request: LayerRequest) -> torch.Tensor:
        return request.budget.clone()
