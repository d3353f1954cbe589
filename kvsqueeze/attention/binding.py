"""Link the key tensor a cache layer hands to the model back to that layer.

``Cache.update`` runs just before the attention function, but transformers passes the attention function
only the tensors, not the cache. The layer tags the key tensor it returns; the attention function reads the
tag. No global state: the tag lives and dies with the tensor, so concurrent caches never mix.
"""

from __future__ import annotations

from typing import Any

import torch

_ATTR = "_kvsqueeze_layer"


def bind(tensor: torch.Tensor, layer: Any) -> None:
    """Tag ``tensor`` with the cache layer that produced it."""
    setattr(tensor, _ATTR, layer)


def bound_layer(tensor: torch.Tensor) -> Any | None:
    """The cache layer that produced ``tensor``, or ``None`` for tensors from any other cache."""
    return getattr(tensor, _ATTR, None)
