"""Allocators split the budget over layers (and, in later allocators, heads).

An allocator turns the per-sequence average budget (tokens per KV head per layer, window included) into the
number of rows one layer keeps for each sequence. Plain tensors only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class LayerRequest:
    """What an allocator knows when sizing one layer."""

    layer_idx: int
    num_layers: int
    budget: torch.Tensor  # (B,) average tokens per head per layer, window included
    prompt_lengths: torch.Tensor  # (B,) real prompt tokens of each sequence
    window: int  # rows the method always keeps at the end


class Allocator(ABC):
    """Base class: subclasses implement :meth:`layer_budget`."""

    name: ClassVar[str] = "allocator"

    @abstractmethod
    def layer_budget(self, request: LayerRequest) -> torch.Tensor:
        """Rows to keep per sequence in this layer, (B,) long (window included)."""
