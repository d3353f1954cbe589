"""``LayerGroup``: what the layers of one cache share, for allocators that size layers against each other.

CAKE, D2O and PrefixKV split one total budget over the layers from a statistic each layer measures on
the prompt (attention entropy and variance, variance of column sums, cumulative importance). A layer
records its statistic here when it has prefilled; the allocator then (re)sizes every layer seen so far
(CAKE's cascade) or all of them at the last layer. The group also tracks the peak bytes the cache held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvsqueeze.cache.layer import SqueezeLayer
    from kvsqueeze.scorers.reconstruction import ReplaySpan


class LayerGroup:
    """The layers of one cache, their prompt statistics, and the cache's peak size."""

    def __init__(self, layers: list[SqueezeLayer]) -> None:
        self.layers = layers
        self.statistics: list[torch.Tensor | None] = [None] * len(layers)
        self.replay_span: ReplaySpan | None = None  # set while a replay round runs (KVzip's scoring)
        self.reset()

    def record(self, layer_idx: int, statistic: torch.Tensor) -> list[torch.Tensor]:
        """Store a layer's statistic; the statistics of layers ``0..layer_idx`` (all must be there)."""
        self.statistics[layer_idx] = statistic
        seen = self.statistics[: layer_idx + 1]
        missing = [i for i, s in enumerate(seen) if s is None]
        if missing:
            raise ValueError(f"layer {missing[0]} recorded no statistic before layer {layer_idx}")
        return seen  # type: ignore[return-value]

    def note_size(self, layer: SqueezeLayer) -> None:
        """``layer`` changed size: update the total the layers hold and its peak.

        Each layer notes its own changes, so this costs one layer's ``nbytes()``, not all of them.
        """
        size = layer.nbytes()
        self.total_nbytes += size - self.sizes[layer.layer_idx]
        self.sizes[layer.layer_idx] = size
        self.peak_nbytes = max(self.peak_nbytes, self.total_nbytes)

    def reset(self) -> None:
        self.statistics = [None] * len(self.layers)
        self.sizes = [0] * len(self.layers)
        self.total_nbytes = 0
        self.peak_nbytes = 0
