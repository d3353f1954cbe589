"""Lossless: at a budget >= the whole sequence, every method matches a stock DynamicCache token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHS,
    LOSSLESS,
    METHOD_NAMES,
    left_padded_batch,
    squeeze_generate,
    stock_generate,
)

from kvsqueeze import SqueezeCache

NEW = 10


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_single_sequence_matches_dynamic_cache(tiny_models, arch, method):
    model = tiny_models(arch)
    ids, _ = left_padded_batch([48], seed=1)
    expected = stock_generate(model, ids, max_new_tokens=NEW)
    cache = SqueezeCache(model, method, budget=48 + NEW, **LOSSLESS.get(method, {}))
    assert torch.equal(squeeze_generate(model, cache, ids, max_new_tokens=NEW), expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_left_padded_batch_matches_dynamic_cache(tiny_models, arch, method):
    model = tiny_models(arch)
    ids, mask = left_padded_batch([40, 23, 31], seed=2)
    expected = stock_generate(model, ids, mask, max_new_tokens=NEW)
    cache = SqueezeCache(model, method, budget=40 + NEW, **LOSSLESS.get(method, {}))
    assert torch.equal(squeeze_generate(model, cache, ids, mask, max_new_tokens=NEW), expected)
    # padding is never kept: each sequence stores exactly its own tokens
    rows = cache.stored_rows()[-1]  # (B, H_kv) of the last layer (full attention in every tiny model)
    assert rows[:, 0].tolist() == [40 + NEW - 1, 23 + NEW - 1, 31 + NEW - 1]


@pytest.mark.parametrize("method", ["full", "snapkv", "h2o", "streaming_llm"])
def test_ratio_one_prefill_methods_keep_everything(tiny_models, method):
    model = tiny_models("llama")
    ids, _ = left_padded_batch([64], seed=3)
    expected = stock_generate(model, ids, max_new_tokens=NEW)
    budget = 1.0 if method != "h2o" else 64 + NEW  # h2o's budget is fixed at prefill, then it evicts per step
    cache = SqueezeCache(model, method, budget=budget)
    assert torch.equal(squeeze_generate(model, cache, ids, max_new_tokens=NEW), expected)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_smollm2_matches_dynamic_cache(smollm2, method):
    model, tokenizer = smollm2
    prompts = [
        "Explain in two sentences why the sky is blue.",
        "List three prime numbers and say which is largest.",
    ]
    from kvsqueeze.generation import encode_prompts

    enc = encode_prompts(tokenizer, prompts)
    expected = stock_generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=NEW)
    cache = SqueezeCache(model, method, budget=enc["input_ids"].shape[1] + NEW, **LOSSLESS.get(method, {}))
    got = squeeze_generate(model, cache, enc["input_ids"], enc["attention_mask"], max_new_tokens=NEW)
    assert torch.equal(got, expected)
    single = encode_prompts(tokenizer, prompts[:1])
    expected = stock_generate(model, single["input_ids"], max_new_tokens=NEW)
    cache = SqueezeCache(model, method, budget=single["input_ids"].shape[1] + NEW)
    assert torch.equal(squeeze_generate(model, cache, single["input_ids"], max_new_tokens=NEW), expected)


def test_sampling_runs_and_is_seeded(tiny_models):
    model = tiny_models("qwen2")
    ids, _ = left_padded_batch([50], seed=4)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        cache = SqueezeCache(model, "h2o", budget=0.5)
        outs.append(
            model.generate(ids, do_sample=True, top_p=0.9, max_new_tokens=8, cache=cache, pad_token_id=0)
        )
    assert torch.equal(outs[0], outs[1])
