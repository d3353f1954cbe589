"""The ``kvsqueeze`` attention implementation, registered through transformers' ``AttentionInterface``.

With a :class:`~kvsqueeze.cache.cache.SqueezeCache` it hands the call to the cache layer, which attends over
its kept rows and lets the method's scorer observe the queries. With any other cache (or none) it is plain
SDPA with the causal and padding masks transformers would build, so a model switched to ``kvsqueeze``
attention behaves exactly like a stock one.

kvsqueeze also registers its own mask type, which hands this function the raw 2-D padding mask (B, seen + q)
instead of a 4-D mask sized by cache length: after eviction, cache length and key count differ, so both
paths build the mask they need from positions.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from kvsqueeze.attention.binding import bound_layer
from kvsqueeze.attention.hooks import install_hooks
from kvsqueeze.attention.masks import attention_mask_for
from kvsqueeze.attention.observation import Observation
from kvsqueeze.attention.sdpa import sdpa

ATTENTION_NAME = "kvsqueeze"


def squeeze_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, q, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    value: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a kvsqueeze cache layer's kept rows, or stock SDPA for any other cache."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = bound_layer(key)
    if layer is not None:
        out = layer.attend(module, query, attention_mask, scaling, dropout, sliding_window, position_ids)
        return out, None
    return _plain_attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window), None


def _plain_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """SDPA over a stock cache's (B, H_kv, T, D) tensors, positions = column indices of the 2-D mask."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    b, hq, q, _ = query.shape
    hk, t = key.shape[1], key.shape[2]
    valid = torch.ones(b, t, dtype=torch.bool, device=key.device)
    if attention_mask is not None:
        valid = attention_mask[:, -t:].to(torch.bool)
    columns = torch.arange(t, device=key.device)
    obs = Observation(
        query=query,
        query_positions=columns[t - q :].expand(b, q),
        query_valid=valid[:, t - q :],
        keys=key,
        values=value,
        key_positions=columns.expand(b, hk, t),
        key_valid=valid[:, None, :].expand(b, hk, t),
        scaling=scaling,
        layer_idx=getattr(module, "layer_idx", 0),
        num_layers=0,
        sliding_window=sliding_window,
        all_keys_valid=bool(valid.all()),
    )
    mask = attention_mask_for(obs)
    return sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling)


def padding_mask(attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask type of ``kvsqueeze`` attention: the 2-D padding mask as it is (None when nothing is padded)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def register_attention() -> None:
    """Register the ``kvsqueeze`` attention function and its mask type with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, squeeze_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, padding_mask)


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Switch ``model`` to kvsqueeze attention (exact; plain SDPA for non-kvsqueeze caches) and return it.

    Also installs the model's kvsqueeze hooks (:mod:`kvsqueeze.attention.hooks`), inert for other caches.
    """
    register_attention()
    if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    install_hooks(model)
    return model
