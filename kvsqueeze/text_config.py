"""Shapes read off a decoder's text config (``model.config.get_text_config(decoder=True)``).

Plain Python: no transformers or kvsqueeze import, so the cache, the quantizers and the scripts can share it.
"""

from __future__ import annotations

from typing import Any


def head_dim_of(config: Any) -> int:
    """Channels per attention head: ``config.head_dim``, or ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types_of(config: Any) -> list[str]:
    """The attention type of every layer (``config.layer_types``; ``"full_attention"`` throughout when unset)."""
    return getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
