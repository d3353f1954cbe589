"""The cache on plain tensors: with the full method it returns exactly what a DynamicCache returns."""

from __future__ import annotations

import pytest
import torch
from conftest import METHOD_NAMES, SMALL_WINDOW, left_padded_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvsqueeze import SqueezeCache
from kvsqueeze.cache import Budget, SqueezeLayer
from kvsqueeze.methods import Full, SnapKV


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
)
def test_full_layer_matches_dynamic_layer(chunks, batch, heads):
    ours = SqueezeLayer(Full().components(), Budget.parse(1.0), layer_idx=0, num_layers=1)
    stock = DynamicCache()
    gen = torch.Generator().manual_seed(sum(chunks))
    seen = 0
    for q in chunks:
        k = torch.randn(batch, heads, q, 4, generator=gen)
        v = torch.randn(batch, heads, q, 4, generator=gen)
        k1, v1 = ours.update(k, v)
        k2, v2 = stock.update(k, v, 0)
        seen += q
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        assert ours.get_seq_length() == stock.get_seq_length() == seen
        assert ours.get_mask_sizes(1) == stock.get_mask_sizes(1, 0)


def test_reset_clears_state_between_sequences():
    layer = SqueezeLayer(SnapKV(window=2).components(), Budget.parse(0.5), layer_idx=0, num_layers=1)
    layer.update(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0 and layer.prompt_lengths is None


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "full"])
def test_fork_equals_a_live_run(tiny_models, arch, method):
    """Prefill once, compress many: a fork of a recorded full cache equals the method run during prefill."""
    model = tiny_models(arch)
    ids, mask = left_padded_batch([90, 70], seed=9)
    params = SMALL_WINDOW.get(method, {})
    source = SqueezeCache(model, "full", record_prefill=True)
    live = SqueezeCache(model, method, 0.3, **params)
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=source)
        model(ids, attention_mask=mask, cache=live)
    forked = source.fork(method, 0.3, **params)
    assert [layer.kept_positions() for layer in forked.layers] == [
        layer.kept_positions() for layer in live.layers
    ]
    assert forked.nbytes() == live.nbytes() and forked.get_seq_length() == live.get_seq_length()
    assert source.stored_rows()[-1, :, 0].tolist() == [90, 70]  # the source is untouched


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_forks_reusing_attention_keep_the_same_rows(tiny_models, arch):
    """fork(reuse_attention=True): the column sums are walked once for H2O, D2O and PrefixKV together, and
    each keeps exactly the rows of its own fork (gemma's sliding layers hold other rows: not shared)."""
    model = tiny_models(arch)
    ids, mask = left_padded_batch([90, 70], seed=11)
    source = SqueezeCache(model, "full", record_prefill=True)
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=source)
    for method in ("h2o", "d2o", "prefixkv", "snapkv"):
        params = SMALL_WINDOW.get(method, {})
        own = source.fork(method, 0.3, **params)
        shared = source.fork(method, 0.3, reuse_attention=True, **params)
        assert [layer.kept_positions() for layer in shared.layers] == [
            layer.kept_positions() for layer in own.layers
        ]
    assert any(layer.recorded._memo for layer in source.layers)  # kept on the recording
    # ZipCache's saliency too: computed once over the prompt, the same split of every layer's rows
    own, shared = source.fork("zipcache"), source.fork("zipcache", reuse_attention=True)
    again = source.fork("zipcache", reuse_attention=True)
    for mine, theirs, third in zip(own.layers, shared.layers, again.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, third.values)
    assert any("normalized_attention" in str(key) for layer in source.layers for key in layer.recorded._memo)
