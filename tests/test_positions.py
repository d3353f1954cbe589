"""After eviction, every new token gets its true RoPE position (its index in the original sequence).

The reference cos/sin are computed here from the RoPE definition (theta^(-2i/d) frequencies, rotate-half
layout), not by the library or by transformers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch

from kvsqueeze import SqueezeCache


def reference_cos_sin(position: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = position * inv_freq
    emb = torch.cat([angles, angles])
    return emb.cos().float(), emb.sin().float()


@pytest.mark.parametrize(
    "method", ["h2o", "snapkv", "streaming_llm", "pyramidkv", "adakv", "mass", "cake", "prefixkv"]
)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_new_tokens_get_their_original_positions(tiny_models, arch, method):
    model = tiny_models(arch)
    prompt, new = 80, 6
    ids, _ = left_padded_batch([prompt], seed=5)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        seen.append((cos[0].clone(), sin[0].clone()))  # (q, head_dim)

    handle = model.model.layers[0].self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        window = {"window": 4} if method in ("snapkv", "pyramidkv", "adakv", "mass", "cake") else {}
        cache = SqueezeCache(model, method, budget=0.25, **window)
        model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache=cache, pad_token_id=0
        )
    finally:
        handle.remove()
    assert cache.layers[0].rows.max_length < prompt  # eviction really happened
    cfg = model.config
    theta = cfg.rope_parameters["rope_theta"]
    head_dim = cfg.head_dim
    assert seen[0][0].shape[0] == prompt
    for step, (cos, sin) in enumerate(seen[1:]):
        ref_cos, ref_sin = reference_cos_sin(prompt + step, head_dim, theta)
        torch.testing.assert_close(cos[-1], ref_cos, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sin[-1], ref_sin, atol=1e-5, rtol=1e-5)
    stored = cache.layers[0].kept_positions()[0][0]
    assert stored[-(new - 1) :] == list(range(prompt, prompt + new - 1))


def test_left_padded_positions_exclude_padding(tiny_models):
    model = tiny_models("llama")
    ids, mask = left_padded_batch([30, 12], seed=6)
    cache = SqueezeCache(model, "snapkv", budget=0.5, window=4)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache=cache, pad_token_id=0)
    short = cache.layers[0].kept_positions()[1][0]
    assert min(short) >= 0 and max(short) == 12 + 3 - 2  # positions count real tokens only
    assert cache.get_seq_length() == 30 + 3 - 1  # logical length counts the mask's columns
