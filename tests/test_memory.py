"""Real memory: at ratio r the cache's tensors hold at most r x the full cache's bytes, + 5%."""

from __future__ import annotations

import pytest
import torch
from conftest import METHOD_NAMES, SELECTING, SMALL_WINDOW, left_padded_batch
from transformers import DynamicCache

from kvsqueeze import SqueezeCache
from kvsqueeze.models.tiny import tiny_model

PROMPT = 600


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.fixture(scope="module")
def model64():
    """A tiny llama with real-model head size (64), so per-row bookkeeping is weighed as on real models."""
    return tiny_model("llama", num_hidden_layers=4, head_dim=64, seed=0)


@pytest.fixture(scope="module")
def full_bytes(model64):
    ids, _ = left_padded_batch([PROMPT], seed=7)
    cache = DynamicCache(config=model64.config)
    with torch.inference_mode():
        model64(ids, cache=cache)
    return dynamic_cache_bytes(cache)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m not in ("full", *SELECTING)])
def test_stored_bytes_follow_the_ratio(model64, full_bytes, method, ratio):
    ids, _ = left_padded_batch([PROMPT], seed=7)
    cache = SqueezeCache(model64, method, budget=ratio, **SMALL_WINDOW.get(method, {}))
    with torch.inference_mode():
        model64(ids, cache=cache)
    stored = cache.nbytes()  # keys, values, positions and scorer state, from the tensors
    assert stored <= ratio * full_bytes * 1.05, (stored / full_bytes, ratio)
    assert cache.kv_nbytes() >= ratio * full_bytes * 0.95  # and it did keep its budget
    assert cache.full_nbytes() == full_bytes


def test_full_method_holds_what_dynamic_cache_holds(model64, full_bytes):
    ids, _ = left_padded_batch([PROMPT], seed=7)
    cache = SqueezeCache(model64, "full")
    with torch.inference_mode():
        model64(ids, cache=cache)
    assert cache.kv_nbytes() == full_bytes
    assert cache.nbytes() <= full_bytes * 1.01  # + int32 positions


def test_h2o_stays_at_budget_while_decoding(model64):
    ids, _ = left_padded_batch([200], seed=8)
    cache = SqueezeCache(model64, "h2o", budget=0.2)
    model64.generate(ids, max_new_tokens=20, do_sample=False, cache=cache, pad_token_id=0)
    assert set(cache.stored_rows().flatten().tolist()) == {40}
