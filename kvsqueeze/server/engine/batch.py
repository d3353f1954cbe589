"""One decode step over many requests' own caches: a ``transformers.Cache`` that multiplexes them.

Continuous batching needs every running request to go through one forward pass per decode step, while
each request keeps its own :class:`~kvsqueeze.cache.cache.SqueezeCache`: its own method, budget, kept rows
(ragged per KV head), positions and schedule (H2O evicts every step, KIVI quantizes every 128 tokens).
:class:`BatchedCache` is built per step from the running caches, in batch order. Its layer hands each
request's slice of the new keys and values to that request's layer and, when the model calls attention,
runs each request's exact attention over its own rows, then concatenates the outputs. The projections and
MLPs (most of the compute) run batched; no row is copied, padded or moved when a request joins or leaves,
since the batch is only a list of caches.

Positions are explicit: the caller passes ``position_ids`` (B, 1), one per sequence (its own logical
length), so no padding is needed and every sequence keeps its true RoPE positions.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsqueeze.attention.binding import bind
from kvsqueeze.cache.cache import SqueezeCache
from kvsqueeze.cache.layer import SqueezeLayer


class BatchedLayer(CacheLayerMixin):
    """Layer ``i`` of a decode batch: the ``i``-th layer of every request's cache, in batch order."""

    is_compileable = False

    def __init__(self, layers: list[SqueezeLayer]) -> None:
        self.layers = layers
        self.is_initialized = all(layer.is_initialized for layer in layers)
        self.is_sliding = layers[0].is_sliding
        self.sliding_window = layers[0].sliding_window
        self._positions: torch.Tensor | None = None  # (B, q) of the current call

    @property
    def batch_size(self) -> int:
        return len(self.layers)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise ValueError("a decode batch is built from prefilled caches")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand request ``b`` its rows ``key_states[b]`` (B, H_kv, q, D); return tensors tagged with this layer."""
        model_kwargs = kwargs.get("kwargs", kwargs) or {}
        positions = model_kwargs.get("position_ids")
        if positions is None:
            raise ValueError("a decode batch needs explicit position_ids (B, q), one row per sequence")
        positions = positions.expand(key_states.shape[0], -1)  # (B, q)
        self._positions = positions
        for b, layer in enumerate(self.layers):
            layer.update(key_states[b : b + 1], value_states[b : b + 1], position_ids=positions[b : b + 1])
        bind(key_states, self)
        return key_states, value_states

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, H, q, D)
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each request's exact attention over its own kept rows; outputs (B, q, H, D) concatenated."""
        positions = self._positions if position_ids is None else position_ids.expand(query.shape[0], -1)
        outputs = [
            layer.attend(
                module,
                query[b : b + 1],
                None if attention_mask is None else attention_mask[b : b + 1],
                scaling,
                dropout,
                sliding_window,
                positions[b : b + 1],
            )
            for b, layer in enumerate(self.layers)
        ]
        return torch.cat(outputs, dim=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """The longest logical length in the batch (positions are passed per sequence, not derived)."""
        return max(layer.get_seq_length() for layer in self.layers)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise ValueError("reset each request's own cache, not the decode batch")

    def offload(self) -> None:
        """Not supported; rows stay where they are."""

    def prefetch(self) -> None:
        """See :meth:`offload`."""


class BatchedCache(Cache):
    """The running requests' caches as one batch for a forward pass, (B,) = ``len(caches)``.

    Build one per step: ``model(input_ids (B, 1), position_ids=(B, 1), cache=BatchedCache(caches))``.
    """

    def __init__(self, caches: list[SqueezeCache]) -> None:
        if not caches:
            raise ValueError("a decode batch needs at least one cache")
        depth = {len(cache.layers) for cache in caches}
        if len(depth) != 1:
            raise ValueError("every cache of a decode batch must belong to the same model")
        self.caches = caches
        layers = [BatchedLayer([cache.layers[i] for cache in caches]) for i in range(depth.pop())]
        super().__init__(layers=layers)
