"""Allocators split the budget over layers (and, in later allocators, heads).

An allocator turns the per-sequence average budget (tokens per KV head per layer, window included) into the
number of rows one layer keeps for each sequence. Plain tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation


@dataclass(frozen=True)
class LayerRequest:
    """What an allocator knows when sizing one layer."""

    layer_idx: int
    num_layers: int
    budget: torch.Tensor  # (B,) average tokens per head per layer, window included
    prompt_lengths: torch.Tensor  # (B,) real prompt tokens of each sequence
    window: int  # rows the method always keeps at the end


class Allocator:
    """Base class: subclasses override :meth:`layer_budget` (or, sizing layers together, :meth:`plan`).

    Allocators that size layers against each other (CAKE, D2O, PrefixKV) set ``uses_statistics`` and
    implement :meth:`layer_statistic` and :meth:`plan`: each layer measures its statistic on the prompt,
    and the plan returns the budgets of the layers to (re)size now.
    """

    name: ClassVar[str] = "allocator"
    uses_statistics: ClassVar[bool] = False

    def layer_budget(self, request: LayerRequest) -> torch.Tensor:
        """Rows to keep per sequence in this layer, (B,) long (window included); by default the average.

        Allocators with ``uses_statistics`` size layers in :meth:`plan` instead and never get this call.
        """
        return request.budget.clone()

    def decode_budget(
        self,
        prefill_budget: torch.Tensor,
        prompt_lengths: torch.Tensor,
        tokens_seen: torch.Tensor,
        stored: torch.Tensor,
    ) -> torch.Tensor:
        """Rows per head (B,) a layer may hold after a call past the prompt; by default what it kept of
        the prompt. ``stored`` (B,) is the most rows a head of the layer holds now, this call's included."""
        return prefill_budget

    def layer_statistic(self, obs: Observation, scores: torch.Tensor) -> torch.Tensor:
        """A layer's prompt statistic from its attention call and its row scores (B, H_kv, T), e.g. (B,)
        (allocators with ``uses_statistics`` only)."""
        raise ValueError(f"the {self.name} allocator measures no layer statistic")

    def plan(self, statistics: list[torch.Tensor], request: LayerRequest) -> dict[int, torch.Tensor]:
        """Budgets (B,) by layer index, from the statistics of layers ``0..request.layer_idx``."""
        return {request.layer_idx: self.layer_budget(request)}
