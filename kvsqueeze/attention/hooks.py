"""Forward hooks that let a kvsqueeze cache see more than keys and values, installed once per model.

Some methods need what the attention function is not handed: a learned scorer reads the hidden states that
enter attention (KVzap), and a replay scorer needs the prompt's token ids and a moment after the prompt's
forward pass to replay it through the model (KVzip). :func:`install_hooks` registers, on one model (never
globally, never at import):

* a pre-hook on the decoder that hands a kvsqueeze cache the call's ``input_ids`` and padding mask;
* a hook after the decoder's forward that lets the cache finish what needs the whole prompt;
* a pre-hook on every attention module that hands the cache layer its input hidden states, only when the
  layer asks for them.

With any other cache the hooks do nothing.
"""

from __future__ import annotations

from typing import Any

import torch

_INSTALLED = "_kvsqueeze_hooks"


def _cache_of(kwargs: dict[str, Any]) -> Any | None:
    from kvsqueeze.cache.cache import SqueezeCache

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, SqueezeCache) else None


def _padding_mask(mask: Any) -> torch.Tensor | None:
    """The 2-D padding mask of a call (``generate`` may pass a dict of prepared masks)."""
    if isinstance(mask, dict):
        mask = next((m for m in mask.values() if isinstance(m, torch.Tensor) and m.dim() == 2), None)
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _before_decoder(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    cache = _cache_of(kwargs)
    if cache is not None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache.before_forward(input_ids, _padding_mask(kwargs.get("attention_mask")))


def _after_decoder(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    cache = _cache_of(kwargs)
    if cache is not None:
        cache.after_forward(module)


def _before_attention(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    cache = _cache_of(kwargs)
    if cache is None:
        return
    layer = cache.layers[module.layer_idx]
    if layer.wants_hidden_states:
        layer.hidden_states = kwargs.get("hidden_states", args[0] if args else None)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model``), or the model itself when it is one."""
    if hasattr(model, "layers"):
        return model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return decoder


def install_hooks(model: torch.nn.Module) -> None:
    """Register kvsqueeze's hooks on ``model`` (idempotent)."""
    if getattr(model, _INSTALLED, False):
        return
    decoder = decoder_of(model)
    decoder.register_forward_pre_hook(_before_decoder, with_kwargs=True)
    decoder.register_forward_hook(_after_decoder, with_kwargs=True)
    for layer in decoder.layers:
        layer.self_attn.register_forward_pre_hook(_before_attention, with_kwargs=True)
    setattr(model, _INSTALLED, True)
