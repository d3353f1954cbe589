"""A model's fingerprint: which weights a learned scorer was fitted for.

The fingerprint hashes the decoder's shape (type, layers, heads, sizes) and the key projections of its first
and last layers, rounded to bfloat16, so a model loaded in fp32, fp16 or bf16 from the same weights gets the
same fingerprint, and a fine-tuned or different model does not. It reads two weight matrices: cheap.
"""

from __future__ import annotations

import hashlib
import json

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits identifying ``model``'s architecture and weights."""
    from kvsqueeze.attention.hooks import decoder_of
    from kvsqueeze.text_config import head_dim_of

    config = model.config.get_text_config(decoder=True)
    shape = {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": head_dim_of(config),
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    layers = decoder_of(model).layers
    for layer in (layers[0], layers[-1]):
        weight = layer.self_attn.k_proj.weight.detach().to("cpu", torch.bfloat16)
        digest.update(weight.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
