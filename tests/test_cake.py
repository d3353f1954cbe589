"""CAKE against the spec's formulas (reference/eviction-methods.md §2) on short random inputs, and its
cascading prefill: same final allocation as planning once, with peak memory near the budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch
from conftest import random_prefill as random_observation
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze import SqueezeCache
from kvsqueeze.allocators.cake import CakeAllocator, adjust_budgets
from kvsqueeze.attention.observation import Observation
from kvsqueeze.models.tiny import tiny_model
from kvsqueeze.scorers.cake_indicator import CakeIndicatorScorer

B, H, HKV, L, D, W = 2, 4, 2, 40, 8, 6


def random_prefill(seed: int) -> Observation:
    return random_observation(seed, B, H, HKV, L, D, scale=2.0)


def window_attention_reference(obs: Observation) -> torch.Tensor:
    """(B, H, W, L): softmax of the last W queries over all keys, causal mask on the last W x W block."""
    keys = obs.keys.repeat_interleave(H // HKV, dim=1)  # (B, H, L, D)
    logits = obs.query[:, :, L - W :] @ keys.transpose(-1, -2) * obs.scaling  # (B, H, W, L)
    mask = torch.ones(W, W).triu(1).bool()
    logits[..., L - W :] = logits[..., L - W :].masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_indicator_is_mean_plus_gamma_variance_pooled(seed):
    obs = random_prefill(seed)
    gamma = 200.0
    attn = window_attention_reference(obs)
    indicator = attn.mean(2) + gamma * attn.var(2, unbiased=True)  # (B, H, L)
    pooled = F.avg_pool1d(indicator.reshape(B * H, 1, L), 5, stride=1, padding=2, count_include_pad=True)
    expected = pooled.view(B, HKV, H // HKV, L).mean(2)
    got = CakeIndicatorScorer(window=W, gamma=gamma).score(obs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [(1.0, 1.0), (1.6, 0.4)])
def test_layer_preference_is_entropy_and_variance(tau):
    obs = random_prefill(3)
    prefix = window_attention_reference(obs)[..., : L - W]  # (B, H, W, L - W), not renormalized
    entropy = -(prefix * torch.log(prefix + 1e-10)).sum(dim=(1, 2, 3))
    shift = prefix.var(2, unbiased=True).sum(dim=(1, 2))
    expected = entropy ** (1 / tau[0]) * shift ** (1 / tau[1])
    got = CakeAllocator(window=W, tau1=tau[0], tau2=tau[1]).layer_statistic(obs, None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    shares=st.lists(st.floats(0, 500), min_size=1, max_size=12),
    cap=st.integers(1, 300),
)
def test_adjust_budgets_caps_and_keeps_the_total(shares, cap):
    total = int(sum(shares))
    budgets = adjust_budgets(shares, cap, total)
    assert all(0 <= b <= cap for b in budgets)
    assert sum(budgets) == min(total, cap * len(shares))


def test_adjust_budgets_spreads_the_excess():
    # truncate -> [30, 3, 4, 1]; cap -> [20, 3, 4, 1] with 10 over; spread 4/3/3 over the three others ->
    # [20, 7, 7, 4] (38); repair +1 each from the first layer with room -> [20, 8, 8, 4] (40)
    assert adjust_budgets([30.7, 3.2, 4.9, 1.2], cap=20, total=40) == [20, 8, 8, 4]


@pytest.fixture(scope="module")
def deep_model():
    """More layers than the other tiny models, so cascading has something to cascade over."""
    return tiny_model("qwen2", num_hidden_layers=12, seed=0)


def test_cascading_ends_where_planning_once_ends(deep_model):
    ids, mask = left_padded_batch([300, 240], seed=13)
    caches = {}
    for cascade in (True, False):
        caches[cascade] = SqueezeCache(deep_model, "cake", 0.2, window=8, cascade=cascade)
        with torch.inference_mode():
            deep_model(ids, attention_mask=mask, cache=caches[cascade])
    assert torch.equal(caches[True].stored_rows(), caches[False].stored_rows())
    assert [layer.kept_positions() for layer in caches[True].layers] == [
        layer.kept_positions() for layer in caches[False].layers
    ]
    rows = caches[True].stored_rows()[:, :, 0]  # (N, B)
    assert rows.amax(0).tolist() != rows.amin(0).tolist()  # layers got different budgets


def test_cascading_keeps_prefill_memory_near_the_budget(deep_model):
    ids, _ = left_padded_batch([400], seed=14)
    full = SqueezeCache(deep_model, "full")
    cascaded = SqueezeCache(deep_model, "cake", 0.2, window=8)
    once = SqueezeCache(deep_model, "cake", 0.2, window=8, cascade=False)
    with torch.inference_mode():
        for cache in (full, cascaded, once):
            deep_model(ids, cache=cache)
    # the budget plus the one layer being prefilled: 0.2 + 1/12
    assert cascaded.peak_nbytes() <= 0.3 * full.nbytes()
    assert once.peak_nbytes() >= 0.99 * full.nbytes()


def test_decoding_evicts_one_row_per_step(deep_model):
    ids, _ = left_padded_batch([200], seed=15)
    cache = SqueezeCache(deep_model, "cake", 0.2, window=8)
    with torch.inference_mode():
        deep_model(ids, cache=cache)
        after_prefill = cache.stored_rows().clone()
        token = ids[:, -1:]
        for _ in range(5):
            token = deep_model(token, cache=cache).logits[:, -1:].argmax(-1)
            assert torch.equal(cache.stored_rows(), after_prefill)  # one in, one out, every layer
    newest = cache.layers[0].kept_positions()[0][0][-5:]
    assert newest == list(range(200, 205))
