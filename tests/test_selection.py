"""Query-aware selection (Quest, MPCache): pages against a brute-force reference, attention over the gathered
rows against masked full attention, incremental page bounds, padded batches, bytes and composition."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, squeeze_generate, stock_generate

from kvsqueeze import SqueezeCache
from kvsqueeze.actions.select import PageIndex, Select
from kvsqueeze.attention.observation import Observation
from kvsqueeze.cache import Budget, SqueezeLayer
from kvsqueeze.methods import MPCache, Quest, get_method
from kvsqueeze.models.tiny import tiny_model

PAGE = 4


def _rows(seed: int, lengths: list[int], kv_heads: int = 2, dim: int = 8):
    """Random keys (S, T, D) padded per segment, positions (S, T) and lengths (S,), S = len(lengths)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    keys = torch.randn(len(lengths), t, dim, generator=g)
    lengths_t = torch.tensor(lengths)
    valid = torch.arange(t)[None, :] < lengths_t[:, None]
    keys = keys * valid[..., None]
    positions = torch.where(valid, torch.arange(t)[None, :] + 3, torch.full_like(valid, -1, dtype=torch.long))
    return keys, positions, lengths_t


def _reference_bounds(keys: torch.Tensor, length: int, page: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per page (min, max) of one segment's keys, by a loop."""
    out = []
    for start in range(0, length, page):
        rows = keys[start : min(start + page, length)]
        out.append((rows.min(0).values, rows.max(0).values))
    return out


def _bound(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> float:
    """Quest's score for a group's queries q (g, D): sum over heads and channels of max(q M, q m)."""
    return float(torch.maximum(q * high, q * low).sum())


def _relative_best_head(q: torch.Tensor, bounds: list[tuple[torch.Tensor, torch.Tensor]], p: int) -> float:
    """Quest's score with ``group="max"``: each head's bound relative to its best page, the best head's."""
    per_head = [[_bound(q[h : h + 1], *b) for b in bounds] for h in range(q.shape[0])]
    return max(scores[p] - max(scores) for scores in per_head)


def _linear(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor, alpha: float) -> float:
    return float((q * (alpha * high + (1 - alpha) * low)).sum())


def _reference_quest(
    q: torch.Tensor, keys: torch.Tensor, length: int, budget: int, page: int, group: str = "sum"
) -> list[int]:
    bounds = _reference_bounds(keys, length, page)
    pages = len(bounds)
    count = pages if budget >= length else min(pages, max(3, budget // page))
    if group == "max":
        middle = sorted(range(1, pages - 1), key=lambda p: -_relative_best_head(q, bounds, p))
    else:
        middle = sorted(range(1, pages - 1), key=lambda p: -_bound(q, *bounds[p]))
    return sorted({0, pages - 1, *middle[: count - 2]})


def _reference_two_level(
    q: torch.Tensor,
    keys: torch.Tensor,
    length: int,
    budget: int,
    page: int,
    coarse: int,
    ratio: float,
    score: str = "linear",
) -> list[int]:
    """Clusters of ``coarse`` pages first (the first, the last and the best others), then the best of their
    pages; ``score`` is MPCache's linear one (alpha 0.6) or Quest's bound."""

    def rate(bounds: tuple[torch.Tensor, torch.Tensor]) -> float:
        return _linear(q, *bounds, 0.6) if score == "linear" else _bound(q, *bounds)

    fine = _reference_bounds(keys, length, page)
    big = _reference_bounds(keys, length, page * coarse)
    pages, clusters = len(fine), len(big)
    count = pages if budget >= length else min(pages, max(3, budget // page))
    wanted = min(clusters, max(2, int(ratio * clusters), -(-count // coarse)))
    middle = sorted(range(1, clusters - 1), key=lambda c: -rate(big[c]))
    chosen = {0, clusters - 1, *middle[: wanted - 2]}
    eligible = [p for p in range(1, pages - 1) if p // coarse in chosen]
    eligible.sort(key=lambda p: -rate(fine[p]))
    return sorted({0, pages - 1, *eligible[: count - 2]})


def _chosen(select: Select, query: torch.Tensor, keys, positions, lengths) -> list[list[int]]:
    index = select.refresh(keys, positions, lengths)
    pages, valid = select.choose_pages(query, index, lengths)
    return [sorted(p[v].tolist()) for p, v in zip(pages, valid, strict=True)]


@pytest.mark.parametrize("bounds_dtype", ["float16", "float32"])
@pytest.mark.parametrize("group", ["sum", "max"])
@pytest.mark.parametrize("seed", range(4))
def test_quest_pages_match_a_brute_force_reference(seed, group, bounds_dtype):
    lengths = [61, 61, 37, 37]  # two sequences x two KV heads, ragged (a padded batch's rows)
    keys, positions, lengths_t = _rows(seed, lengths)
    query = torch.randn(2, 6, 1, 8, generator=torch.Generator().manual_seed(100 + seed))  # g = 3
    select = Select(page_size=PAGE, score="bound", group=group, bounds_dtype=bounds_dtype)
    select.set_budget(torch.tensor([61, 37]), torch.tensor([20, 14]))
    got = _chosen(select, query, keys, positions, lengths_t)
    groups = query[:, :, 0].reshape(4, 3, 8)  # segment s = b * H_kv + h: its query heads
    budgets = [20, 20, 14, 14]
    expected = [_reference_quest(groups[s], keys[s], lengths[s], budgets[s], PAGE, group) for s in range(4)]
    assert got == expected
    assert all(len(p) * PAGE <= max(b, 3 * PAGE) for p, b in zip(got, budgets, strict=True))


@pytest.mark.parametrize("bounds_dtype", ["float16", "float32"])
@pytest.mark.parametrize("seed", range(4))
def test_mpcache_pages_match_a_brute_force_reference(seed, bounds_dtype):
    lengths = [97, 97, 70, 70]
    keys, positions, lengths_t = _rows(seed, lengths)
    query = torch.randn(2, 4, 1, 8, generator=torch.Generator().manual_seed(200 + seed))  # g = 2
    select = Select(
        page_size=PAGE, score="linear", alpha=0.6, coarse=2, coarse_ratio=0.5, bounds_dtype=bounds_dtype
    )
    select.set_budget(torch.tensor([97, 70]), torch.tensor([30, 20]))
    got = _chosen(select, query, keys, positions, lengths_t)
    groups = query[:, :, 0].reshape(4, 2, 8)
    budgets = [30, 30, 20, 20]
    expected = [
        _reference_two_level(groups[s], keys[s], lengths[s], budgets[s], PAGE, 2, 0.5) for s in range(4)
    ]
    assert got == expected


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6])
@pytest.mark.parametrize("seed", range(3))
def test_two_level_bound_pages_match_a_brute_force_reference(seed, ratio):
    """Quest's bound over clusters of 4 pages first (a share ``ratio`` of them, never fewer than the budget
    fills), then over the chosen clusters' pages; ragged segments, so the clusters past a short segment's
    rows never count."""
    lengths = [150, 150, 91, 91]
    keys, positions, lengths_t = _rows(seed, lengths)
    query = torch.randn(2, 6, 1, 8, generator=torch.Generator().manual_seed(300 + seed))  # g = 3
    select = Select(page_size=PAGE, score="bound", coarse=4, coarse_ratio=ratio)
    select.set_budget(torch.tensor([150, 91]), torch.tensor([24, 16]))
    got = _chosen(select, query, keys, positions, lengths_t)
    groups = query[:, :, 0].reshape(4, 3, 8)
    budgets = [24, 24, 16, 16]
    expected = [
        _reference_two_level(groups[s], keys[s], lengths[s], budgets[s], PAGE, 4, ratio, "bound")
        for s in range(4)
    ]
    assert got == expected
    # the clusters' bounds are kept beside the pages' and counted with them
    assert select.index.clusters is not None and select.nbytes() > select.index.clusters.nbytes() > 0


def test_half_precision_bounds_choose_as_fp32_ones_at_large_magnitudes():
    """Keys and queries big enough that an unscaled fp16 score would overflow: the default fp16 bounds pick
    the pages fp32 bounds pick, and store half their bytes."""
    keys, positions, lengths = _rows(11, [80, 80, 80, 80])
    keys = keys * 3000
    query = 100 * torch.randn(2, 6, 1, 8, generator=torch.Generator().manual_seed(12))
    chosen = {}
    for dtype in ("float16", "float32"):
        select = Select(page_size=PAGE, bounds_dtype=dtype)
        select.set_budget(torch.tensor([80, 80]), torch.tensor([24, 24]))
        chosen[dtype] = _chosen(select, query, keys, positions, lengths)
        chosen[dtype + " bytes"] = select.nbytes()
    assert chosen["float16"] == chosen["float32"]
    assert 2 * chosen["float16 bytes"] == chosen["float32 bytes"]
    with pytest.raises(ValueError, match="bounds_dtype"):
        Select(bounds_dtype="int8")


def test_page_bounds_stay_current_as_rows_are_appended():
    keys, positions, lengths = _rows(5, [50, 50, 33, 33])
    index = PageIndex(PAGE)
    start = lengths - 20
    index.refresh(keys, positions, start)
    for step in range(1, 21):  # one row per segment at a time, as decoding appends
        index.refresh(keys, positions, start + step)
        fresh = PageIndex(PAGE)
        fresh.refresh(keys, positions, start + step)
        assert torch.equal(index.kmin, fresh.kmin) and torch.equal(index.kmax, fresh.kmax)
    # an evicted row changes every later page: detected from the positions, and rebuilt
    kept = torch.cat([keys[:, :5], keys[:, 6:], keys[:, :1]], dim=1)
    moved = torch.cat([positions[:, :5], positions[:, 6:], positions[:, :1]], dim=1)
    assert not index.is_current(moved, lengths - 1)
    index.refresh(kept, moved, lengths - 1)
    fresh = PageIndex(PAGE)
    fresh.refresh(kept, moved, lengths - 1)
    assert torch.equal(index.kmin, fresh.kmin) and torch.equal(index.kmax, fresh.kmax)


def test_in_place_append_when_segments_agree_matches_a_rebuild():
    """The decode step's shortcut (every segment holds T rows, the bounds cover T - 1) gives the bounds a
    rebuild gives, across page boundaries; it declines when the bounds are not one row behind."""
    keys, positions, lengths = _rows(6, [40, 40, 40])
    index = PageIndex(PAGE)
    index.refresh(keys[:, :21], positions[:, :21], lengths - 19)
    for t in range(22, 41):
        assert index.append_row(keys[:, :t], positions[:, :t])
        fresh = PageIndex(PAGE)
        fresh.refresh(keys[:, :t], positions[:, :t], torch.full_like(lengths, t))
        assert torch.equal(index.kmin, fresh.kmin) and torch.equal(index.kmax, fresh.kmax)
        assert torch.equal(index.covered, fresh.covered) and index.covered_all == t
    assert not index.append_row(keys, positions)  # already covers all 40 rows
    ragged = PageIndex(PAGE)
    ragged.refresh(keys, positions, torch.tensor([40, 39, 40]))
    assert ragged.covered_all is None and not ragged.append_row(keys, positions)


class _Attention(torch.nn.Module):
    """What SDPA reads of an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def test_decode_attends_to_the_gathered_rows_exactly():
    """One decode step's output equals softmax over the chosen pages' rows only (the rest masked out of a
    full score matrix, built here as the reference), and reads at most the budget's pages."""
    torch.manual_seed(0)
    b, h, h_kv, d, prompt = 2, 4, 2, 8, 90
    layer = SqueezeLayer(
        Quest(page_size=PAGE, dense_layers=0).components(), Budget.parse(24), layer_idx=0, num_layers=1
    )
    module = _Attention(h // h_kv)
    keys, values = torch.randn(b, h_kv, prompt, d), torch.randn(b, h_kv, prompt, d)
    layer.update(keys, values)
    layer.attend(module, torch.randn(b, h, prompt, d), None, d**-0.5)
    k1, v1, q1 = torch.randn(b, h_kv, 1, d), torch.randn(b, h_kv, 1, d), torch.randn(b, h, 1, d)
    layer.update(k1, v1)
    all_keys, all_values = torch.cat([keys, k1], 2), torch.cat([values, v1], 2)  # (B, H_kv, 91, D)
    index = PageIndex(PAGE)
    index.refresh(
        all_keys.reshape(b * h_kv, -1, d), torch.arange(91).expand(b * h_kv, 91), torch.full((4,), 91)
    )
    pages, valid = layer.components.select.choose_pages(q1, index, torch.full((4,), 91))
    out = layer.attend(module, q1, None, d**-0.5)  # (B, 1, H, D)
    allowed = torch.zeros(b * h_kv, 91, dtype=torch.bool)
    for s in range(b * h_kv):
        for p in pages[s][valid[s]].tolist():
            allowed[s, p * PAGE : (p + 1) * PAGE] = True
    assert int(allowed.sum(-1).max()) <= 24  # 24 // 4 = 6 pages of 4 rows
    assert not bool(allowed.all())
    logits = torch.einsum("bkgd,bktd->bkgt", q1[:, :, 0].view(b, h_kv, 2, d), all_keys) * d**-0.5
    logits = logits.masked_fill(~allowed.view(b, h_kv, 1, 91), float("-inf"))
    expected = torch.einsum("bkgt,bktd->bkgd", logits.softmax(-1), all_values).reshape(b, h, d)
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("method", "extra"), [("quest", {}), ("quest", {"group": "max"}), ("mpcache", {})])
def test_padded_batch_selects_as_each_sequence_alone(tiny_models, method, extra):
    """Left padding is never a page: each sequence of a padded batch decodes as it does alone."""
    model = tiny_models("llama")
    params = {"dense_layers": 0, **extra}
    lengths = [150, 97, 120]
    ids, mask = left_padded_batch(lengths, seed=12)
    batch = squeeze_generate(model, SqueezeCache(model, method, 0.2, **params), ids, mask, max_new_tokens=8)
    for i, n in enumerate(lengths):
        alone = ids[i : i + 1, ids.shape[1] - n :]
        got = squeeze_generate(model, SqueezeCache(model, method, 0.2, **params), alone, max_new_tokens=8)
        assert torch.equal(got, batch[i : i + 1]), i


def test_small_budget_changes_the_answer_and_a_covering_one_does_not(tiny_models):
    """Selection really restricts attention (a tiny budget changes some logits), while a budget covering the
    context is the full cache token for token (the lossless matrix checks every architecture)."""
    model = tiny_models("qwen2")
    ids, _ = left_padded_batch([160], seed=13)
    expected = stock_generate(model, ids, max_new_tokens=6)
    full = squeeze_generate(model, SqueezeCache(model, "quest", 200, dense_layers=0), ids, max_new_tokens=6)
    assert torch.equal(full, expected)
    cache = SqueezeCache(model, "quest", 16, dense_layers=0)
    with torch.inference_mode():
        model(ids, cache=cache)
        step = torch.tensor([[5]])
        small = model(step, cache=cache).logits
        dense = SqueezeCache(model, "quest", 1.0, dense_layers=0)
        model(ids, cache=dense)
        reference = model(step, cache=dense).logits
    assert not torch.allclose(small, reference)


def test_bytes_are_every_row_plus_the_page_bounds():
    model = tiny_model("llama", num_hidden_layers=4, head_dim=64, seed=0)
    ids, _ = left_padded_batch([600], seed=7)
    full = SqueezeCache(model, "full")
    quest = SqueezeCache(model, "quest", 0.1)
    mp = SqueezeCache(model, "mpcache", 0.1, static_keep=0.5)
    with torch.inference_mode():
        for cache in (full, quest, mp):
            model(ids, cache=cache)
    h_kv = model.config.num_key_value_heads

    def bounds(rows: int, page: int = 16, per_cluster: int = 1) -> int:
        """Min and max per page and channel, fp16, with spare pages (to whole clusters)."""
        pages = -(-rows // page)
        capacity = pages + max(4, int(pages * PageIndex.GROWTH))
        return 2 * h_kv * -(-capacity // per_cluster) * per_cluster * 64 * 2

    assert quest.kv_nbytes() == full.kv_nbytes()  # nothing evicted
    # layers 2 and 3 select (the first two are dense)
    assert quest.nbytes() == full.nbytes() + 2 * bounds(600)
    assert mp.kv_nbytes() == full.kv_nbytes() // 2
    assert mp.nbytes() == full.nbytes() // 2 + 4 * (
        bounds(300, per_cluster=2) + bounds(300, page=32)
    )  # and its clusters'
    assert 2 * bounds(600) / full.kv_nbytes() < 2 * (1 / 16) * 1.2 / 4  # about 1/16 of fp32 keys' bytes


def test_mpcache_static_eviction_keeps_one_set_per_layer_with_the_window():
    model = tiny_model("qwen2", num_hidden_layers=2, seed=1)
    ids, _ = left_padded_batch([200], seed=14)
    cache = SqueezeCache(model, "mpcache", 0.1, static_keep=0.3)
    with torch.inference_mode():
        model(ids, cache=cache)
    for layer in cache.layers:
        kept = layer.kept_positions()[0]
        assert all(heads == kept[0] for heads in kept)  # every KV head keeps the same rows
        assert len(kept[0]) == 60 and set(range(160, 200)) <= set(kept[0])  # 30%, the last 20% in it


def test_mpcache_threshold_keeps_the_rows_that_reach_it():
    obs_model = tiny_model("llama", num_hidden_layers=1, seed=2)
    ids, _ = left_padded_batch([100], seed=15)
    everything = SqueezeCache(obs_model, "mpcache", 0.1, threshold=0.0, static_keep=1.0)
    nothing = SqueezeCache(obs_model, "mpcache", 0.1, threshold=2.0, static_keep=1.0)
    with torch.inference_mode():
        obs_model(ids, cache=everything)
        obs_model(ids, cache=nothing)
    assert everything.stored_rows().flatten().tolist() == [100, 100]
    assert nothing.stored_rows().flatten().tolist() == [20, 20]  # the observation window only


def test_observation_peak_is_the_max_of_the_head_mean():
    from conftest import random_prefill

    from kvsqueeze.scorers.observation_peak import ObservationPeakScorer

    obs: Observation = random_prefill(3, batch=1, heads=4, kv_heads=2, length=50, dim=8)
    scores = ObservationPeakScorer(0.2).score(obs)  # (1, 2, 50)
    logits = obs.query[0].float() @ obs.keys[0].repeat_interleave(2, 0).float().transpose(1, 2) * obs.scaling
    logits = logits.masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    mean = logits.softmax(-1).mean(0)  # (50 queries, 50 keys)
    expected = mean[40:].amax(0)
    assert torch.equal(scores[0, 0], scores[0, 1])
    torch.testing.assert_close(scores[0, 0, :40], expected[:40])
    assert bool(torch.isinf(scores[0, 0, 40:]).all())


def test_compositions():
    model = tiny_model("llama", num_hidden_layers=3, seed=0)
    ids, _ = left_padded_batch([120], seed=16)
    snap = SqueezeCache(model, "snapkv+quest", 0.5, window=8, select_ratio=0.2, dense_layers=0)
    quantized = SqueezeCache(model, "quest+kivi", 0.2, group_size=8, residual=16, dense_layers=0)
    with torch.inference_mode():
        model(ids, cache=snap)
        model(ids, cache=quantized)
        for cache in (snap, quantized):
            for _ in range(20):  # past a KIVI block: the bounds follow the dequantized keys
                model(torch.tensor([[7]]), cache=cache)
    assert snap.stored_rows()[-1, 0].tolist() == [80, 80]  # snapkv kept 60 of the prompt, 20 decoded
    select = snap.layers[-1].components.select
    assert int(select.token_budget[0]) == 24  # 0.2 of the 120-token prompt
    layer = quantized.layers[-1]
    assert layer.rows.tiers[0].rows.num_rows > 0  # rows were quantized, a block while decoding too
    assert quantized.kv_nbytes() < 0.3 * quantized.full_nbytes()
    layer._refresh_selection()  # the bounds summarize the keys attention reads (dequantized)
    fresh = PageIndex(16)
    fresh.refresh(layer.rows.padded("keys"), layer.rows.padded("positions", fill=-1), layer.rows.lengths)
    assert torch.equal(layer.components.select.index.kmax, fresh.kmax)
    for name, message in [
        ("snapkv+quest", "give quest its own select_ratio"),
        ("snapkv+mpcache", "evicts by itself"),
        ("quest+quest", "already selects"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_method(name)
    with pytest.raises(ValueError, match="static_keep must be in"):
        MPCache(static_keep=0.1)
    with pytest.raises(ValueError, match="not both"):
        Quest(select_ratio=0.1, select_tokens=10)
