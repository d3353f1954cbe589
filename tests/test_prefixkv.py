"""PrefixKV against the spec (reference/eviction-methods.md §4) on short random inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch

from kvsqueeze import SqueezeCache
from kvsqueeze.allocators.prefix import bisect_forget
from kvsqueeze.models.tiny import tiny_model


def spec_forget(importances: list[list[float]], length: int, evicted: float) -> list[int]:
    """Plain-Python transcription of the official search: bisection on p, then rescaling."""
    cdfs = []
    for s in importances:
        ordered = sorted(s, reverse=True)
        total, running, cdf = sum(ordered), 0.0, []
        for x in ordered:
            running += x
            cdf.append(running / total)
        cdfs.append(cdf)

    def forget(p: float) -> list[int]:
        return [max(0, length - sum(1 for c in cdf if c < p) - 1 - 5) for cdf in cdfs]

    target = evicted * len(importances) * length
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        counts = forget(mid)
        if abs(sum(counts) - target) < 5:
            break
        if sum(counts) < target:
            high = mid
        else:
            low = mid
    return [int(f * target / sum(counts)) for f in counts]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("evicted", [0.5, 0.75, 0.9])
def test_bisection_matches_the_spec(seed, evicted):
    g = torch.Generator().manual_seed(seed)
    length, layers = 120, 6
    importances = (torch.rand(layers, length, generator=g) ** (1 + torch.arange(layers)[:, None])).tolist()
    ordered = torch.tensor(importances).sort(-1, descending=True).values
    cumulative = ordered.cumsum(-1) / ordered.sum(-1, keepdim=True)
    got = bisect_forget(cumulative, length, evicted * layers * length)
    assert got == spec_forget(importances, length, evicted)
    assert abs(sum(got) - evicted * layers * length) <= layers + 5


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", num_hidden_layers=6, seed=0)


def test_layers_share_one_level_and_keep_the_sinks(model):
    ids, _ = left_padded_batch([240], seed=16)
    cache = SqueezeCache(model, "prefixkv", 0.3)
    with torch.inference_mode():
        model(ids, cache=cache)
    rows = cache.stored_rows()[:, 0]  # (N, H_kv)
    assert bool((rows == rows[:, :1]).all())  # the heads of a layer keep the same rows
    assert abs(int(rows[:, 0].sum()) - 0.3 * 6 * 240) <= 6 + 5
    assert len(set(rows[:, 0].tolist())) > 1  # layers got different budgets
    for layer in cache.layers:
        kept = layer.kept_positions()[0]
        assert kept[0] == kept[1]
        assert kept[0][:4] == [0, 1, 2, 3] and kept[0][-1] == 239


def test_decoding_is_a_fifo_past_a_frozen_prefix(model):
    ids, _ = left_padded_batch([240], seed=17)
    cache = SqueezeCache(model, "prefixkv", 0.3)
    with torch.inference_mode():
        model(ids, cache=cache)
        prompt_kept = [layer.kept_positions()[0][0] for layer in cache.layers]
        token = ids[:, -1:]
        for _ in range(30):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    for layer, before in zip(cache.layers, prompt_kept, strict=True):
        after = layer.kept_positions()[0][0]
        kept = len(before)
        assert len(after) == kept * 270 // 240  # grows at the rate it kept the prompt
        frozen = kept - 25 if kept - 25 >= 1 else kept // 2
        assert after[:frozen] == before[:frozen]  # the compressed prompt before d never changes
        tail = after[frozen:]
        assert tail == sorted(tail) and tail[-1] == 269  # the rest is the newest rows, in order


def test_a_multi_token_call_deletes_one_row_per_head(model):
    """The official hook deletes one row per forward call: a 20-token chunk after the prompt grows each
    head by 19, and the one-token steps after it delete one row each (size steady) until the rate holds."""
    ids, _ = left_padded_batch([240], seed=18)
    chunk = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = SqueezeCache(model, "prefixkv", 0.3)
    with torch.inference_mode():
        model(ids, cache=cache)
        before = cache.stored_rows()[:, 0].clone()  # (N, H_kv)
        prompt_kept = [layer.kept_positions()[0][0] for layer in cache.layers]
        token = model(chunk, cache=cache).logits[:, -1:].argmax(-1)
        after_chunk = cache.stored_rows()[:, 0].clone()
        assert bool((after_chunk == before + 19).all())  # one deletion per layer and head, not ~14
        for layer, kept in zip(cache.layers, prompt_kept, strict=True):
            rows = layer.kept_positions()[0][0]
            assert rows[-20:] == list(range(240, 260))  # the chunk is all kept
            assert len(set(kept) - set(rows)) == 1  # one prompt row went, the oldest past the frozen prefix
            frozen = len(kept) - 25 if len(kept) - 25 >= 1 else len(kept) // 2
            assert rows[:frozen] == kept[:frozen] and kept[frozen] not in rows
        for step in range(10):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
            rows = cache.stored_rows()[:, 0]
            rate = before * (260 + step + 1) // 240  # (1 - r_l) * tokens seen
            assert bool((rows == torch.maximum(after_chunk, rate)).all())
