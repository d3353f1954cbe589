"""Actions: what happens to the rows a method does not keep at full fidelity.

An action receives the layer's packed rows, the scores, and the rows chosen to stay, and changes storage:

* evict: free every row not chosen;
* merge (D2O): fold each evicted row into its most similar kept row before freeing it;
* select (MPCache, Quest, next): keep every row, and restrict attention to a query-dependent subset instead.

How the chosen rows are *stored* is a separate step, :class:`~kvsqueeze.actions.quantize.Quantize`
(ZipCache, KIVI): it runs after any of these on whatever is left, so eviction and quantization compose.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.cache.packed import PackedRows


class Action(ABC):
    """Base class: subclasses implement :meth:`apply`."""

    name: ClassVar[str] = "action"

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep the per-sequence state of sequences ``indices`` (beam reordering); stateless: nothing."""
        return None

    @abstractmethod
    def apply(
        self,
        rows: PackedRows,
        obs: Observation | None,  # None when a layer is resized later, without its queries
        scores: torch.Tensor,  # (B, H_kv, T) fp32
        keep: torch.Tensor,  # (B * H_kv, T) bool: the rows that stay at full fidelity
    ) -> None:
        """Change ``rows`` so that the chosen rows stay and the others are handled by this action."""
