"""Lossless equivalence on the larger packaged models (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch
from conftest import squeeze_generate, stock_generate

from kvsqueeze import SqueezeCache
from kvsqueeze.models import PACKAGED_MODELS, is_installed, load_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b", "gemma3-270m"])
@pytest.mark.parametrize("method", ["full", "snapkv", "h2o"])
def test_packaged_model_matches_dynamic_cache(alias, method):
    if not is_installed(alias):
        pytest.skip(f"{alias} is not installed: {PACKAGED_MODELS[alias].pip_command}")
    model, tokenizer = load_model(alias, progress=False)
    text = "The quick brown fox jumps over the lazy dog. " * 60  # > 512 tokens: Gemma's sliding layers slide
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    expected = stock_generate(model, ids, max_new_tokens=8)
    cache = SqueezeCache(model, method, budget=ids.shape[1] + 8)
    assert torch.equal(squeeze_generate(model, cache, ids, max_new_tokens=8), expected)
