"""Tiny random models of each supported architecture, built from a config (nothing downloaded).

They are for tests: small enough to run in milliseconds, with the same attention layout as the real
models (grouped-query attention, and for Gemma 3 sliding-window layers mixed with full ones). A large
``initializer_range`` makes the logits peaky, so greedy decoding has clear winners and is stable.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from kvsqueeze.cache.cache import SUPPORTED_ARCHITECTURES

__all__ = ["SUPPORTED_ARCHITECTURES", "TINY_VOCAB_SIZE", "tiny_config", "tiny_model", "tiny_tokenizer"]

TINY_VOCAB_SIZE = 512
TINY_SLIDING_WINDOW = 16

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gemma3_text": Gemma3TextConfig,
}


def _arch_defaults(arch: str, num_hidden_layers: int) -> dict[str, Any]:
    if arch == "gemma3_text":
        # Alternate sliding / full, ending on a full layer (real Gemma 3 uses 5 sliding : 1 full).
        layer_types = [
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(num_hidden_layers)
        ]
        if num_hidden_layers > 1:
            layer_types[-1] = "full_attention"
        return {
            "sliding_window": TINY_SLIDING_WINDOW,
            "layer_types": layer_types,
            "query_pre_attn_scalar": 16,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        }
    defaults: dict[str, Any] = {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}}
    if arch == "mistral":
        defaults["sliding_window"] = None  # like Mistral v0.2+: full attention everywhere
    return defaults


def tiny_config(arch: str, *, num_hidden_layers: int = 2, **overrides: Any) -> PretrainedConfig:
    """The config :func:`tiny_model` builds ``arch`` from; ``overrides`` replace any field."""
    if arch not in _CONFIG_CLASSES:
        raise ValueError(
            f"unknown tiny architecture {arch!r}; choose one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    fields: dict[str, Any] = {
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "initializer_range": 0.2,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **_arch_defaults(arch, num_hidden_layers),
    }
    fields.update(overrides)
    return _CONFIG_CLASSES[arch](**fields)


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    num_hidden_layers: int = 2,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of architecture ``arch`` (see ``SUPPORTED_ARCHITECTURES``).

    Hidden size 64, 4 query heads and 2 KV heads of size 16, vocabulary 512, 4096 positions; Gemma 3
    gets a sliding window of 16 with sliding and full layers alternating. Weights come from
    ``torch.manual_seed(seed)``, so equal seeds give equal models. Returned in eval mode, float32.
    ``overrides`` replace config fields (e.g. ``sliding_window=8``).
    """
    config = tiny_config(arch, num_hidden_layers=num_hidden_layers, **overrides)
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer for the tiny models: one token per UTF-8 byte (ids 3..258), ``<pad>`` 0,
    ``<s>`` 1, ``</s>`` 2; with ``chat``, a minimal chat template. Built in memory, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer
