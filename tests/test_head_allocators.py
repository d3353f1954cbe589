"""Head-wise budgets: Ada-KV's global top-k with a floor, and the mass (top-p) allocator.

Reference implementations below are written from the spec (reference/eviction-methods.md §8) with plain
Python lists, independently of the tensor code.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import left_padded_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze import SqueezeCache
from kvsqueeze.allocators import AdaKVHeads, MassHeads, UniformHeads
from kvsqueeze.models.tiny import tiny_model


def adakv_reference(scores: list[list[float]], base: int, alpha: float) -> list[int]:
    """Counts per head (non-protected rows) for one sequence: global top H*B', counted per head."""
    flat = sorted(((s, h) for h, row in enumerate(scores) for s in row), reverse=True)
    chosen = [0] * len(scores)
    for _, h in flat[: base * len(scores)]:
        chosen[h] += 1
    return [round((1 - alpha) * c + math.floor(alpha * base)) for c in chosen]


def mass_reference(scores: list[float], p: float) -> int:
    """Fewest rows whose share of the total reaches p; p = 1 keeps every row (the method's lossless setting,
    which a float sum must not cut short when the last rows are nearly zero)."""
    ordered = sorted((max(s, 0.0) for s in scores), reverse=True)
    if p >= 1.0:
        return len(ordered)
    total, running = sum(ordered), 0.0
    for n, s in enumerate(ordered, start=1):
        running += s
        if running / total >= p:
            return n
    return len(ordered)


def _inputs(seed: int, b: int, h: int, t: int, protected_tail: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, h, t, generator=g) ** 4  # skewed, like attention
    protected = torch.zeros(b, h, t, dtype=torch.bool)
    protected[..., t - protected_tail :] = True
    return scores, ~protected, protected


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    h=st.integers(1, 6),
    t=st.integers(12, 60),
    alpha=st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0]),
    budget_share=st.floats(0.1, 0.9),
)
def test_adakv_counts_match_the_spec(seed, h, t, alpha, budget_share):
    window = 4
    scores, candidates, protected = _inputs(seed, 2, h, t, window)
    base = max(1, int(budget_share * (t - window)))
    counts = AdaKVHeads(alpha).head_counts(scores, candidates, protected, torch.tensor([base + window] * 2))
    for i in range(2):
        expected = adakv_reference(scores[i, :, : t - window].tolist(), base, alpha)
        assert (counts[i] - window).tolist() == expected
        # the total stays at the layer budget up to rounding: at most half a row over per head, and at
        # most 1.5 under (round, and the floor of alpha * B')
        assert -1.5 * h <= int(counts[i].sum()) - h * (base + window) <= h / 2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 4), p=st.sampled_from([0.5, 0.9, 0.95, 1.0]))
def test_mass_counts_match_top_p(seed, h, p):
    t, window = 40, 4
    scores, candidates, protected = _inputs(seed, 1, h, t, window)
    counts = MassHeads(p).head_counts(scores, candidates, protected, torch.tensor([t]))
    expected = [mass_reference(scores[0, j, : t - window].tolist(), p) + window for j in range(h)]
    assert counts[0].tolist() == expected
    capped = MassHeads(p).head_counts(scores, candidates, protected, torch.tensor([10]))
    assert capped.max() <= 10


def test_uniform_heads_broadcast_the_layer_budget():
    scores, candidates, protected = _inputs(0, 2, 3, 20, 2)
    assert UniformHeads().head_counts(scores, candidates, protected, torch.tensor([5, 7])).tolist() == [
        [5, 5, 5],
        [7, 7, 7],
    ]


@pytest.fixture(scope="module")
def model_4kv():
    """A tiny llama with 4 KV heads and real head size, so head budgets can differ."""
    return tiny_model("llama", num_hidden_layers=3, num_key_value_heads=4, head_dim=64, seed=0)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_adakv_frees_memory_with_unequal_heads(model_4kv, ratio):
    ids, _ = left_padded_batch([400], seed=11)
    cache = SqueezeCache(model_4kv, "adakv", ratio, window=8)
    full = SqueezeCache(model_4kv, "full")
    with torch.inference_mode():
        model_4kv(ids, cache=cache)
        model_4kv(ids, cache=full)
    rows = cache.stored_rows()  # (N, B, H_kv)
    assert bool((rows.amax(-1) > rows.amin(-1)).any()), "heads should keep different numbers of rows"
    assert cache.nbytes() <= ratio * full.nbytes() * 1.05
    # the freed rows are really gone: key/value bytes are the rows kept, nothing padded
    per_row = 2 * 64 * 4  # key + value, fp32
    assert cache.kv_nbytes() == int(rows.sum()) * per_row


def test_mass_reports_the_ratio_it_reached(model_4kv):
    ids, mask = left_padded_batch([300, 200], seed=12)
    ratios = {}
    for p in (0.5, 0.9, 1.0):
        cache = SqueezeCache(model_4kv, "mass", 1.0, p=p, window=8)
        with torch.inference_mode():
            model_4kv(ids, attention_mask=mask, cache=cache)
        ratios[p] = cache.kept_ratio()  # (B,)
    assert ratios[1.0].tolist() == [1.0, 1.0]
    assert bool((ratios[0.5] < ratios[0.9]).all()) and bool((ratios[0.9] < 1.0).all())
    capped = SqueezeCache(model_4kv, "mass", 0.2, p=0.99, window=8)
    with torch.inference_mode():
        model_4kv(ids, attention_mask=mask, cache=capped)
    assert bool((capped.kept_ratio() <= 0.2 + 1e-6).all())


def test_bad_head_parameters():
    with pytest.raises(ValueError, match="alpha"):
        SqueezeCache(tiny_model("llama", num_hidden_layers=1, seed=0), "adakv", 0.5, alpha=1.5)
    with pytest.raises(ValueError, match="p must be in"):
        SqueezeCache(tiny_model("llama", num_hidden_layers=1, seed=0), "mass", 0.5, p=0)
    with pytest.raises(ValueError, match="layers must be"):
        SqueezeCache(tiny_model("llama", num_hidden_layers=1, seed=0), "adakv", 0.5, layers="cone")
