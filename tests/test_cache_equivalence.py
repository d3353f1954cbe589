"""The cache on plain tensors: with the full method it returns exactly what a DynamicCache returns."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

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
