"""Prompt-share allocator: every layer keeps a fixed share of the prompt, whatever the cache's budget.

For methods whose budget means something else: MPCache's budget is the tokens a decode step attends to,
while its static eviction keeps ``static_keep`` of the prompt (spec B §2, ``static_keep_ratio``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvsqueeze.allocators.base import Allocator, LayerRequest


class PromptShareAllocator(Allocator):
    """Each layer keeps ``ceil(share * prompt length)`` rows per head."""

    name: ClassVar[str] = "prompt_share"

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"prompt share must be in (0, 1], got {share}")
        self.share = share

    def layer_budget(self, request: LayerRequest) -> torch.Tensor:
        return torch.ceil(request.prompt_lengths.double() * self.share).long().clamp(min=1)
