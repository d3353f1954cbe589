"""D2O against the spec (reference/eviction-methods.md §3): layer allocation and the merge step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import left_padded_batch, random_prefill

from kvsqueeze import SqueezeCache
from kvsqueeze.actions.merge import Merge
from kvsqueeze.allocators.base import LayerRequest
from kvsqueeze.allocators.d2o import D2OAllocator
from kvsqueeze.cache.packed import PackedRows
from kvsqueeze.models.tiny import tiny_model


def spec_budgets(sigma: list[float], length: int, rho: float) -> list[int]:
    n = len(sigma)
    exp = [math.exp(-s) for s in sigma]
    weights = [e / sum(exp) for e in exp]
    return [max(1, math.floor((length + 1) * min(1.0, max(0.01, n * rho * w)))) for w in weights]


@pytest.mark.parametrize("seed", range(4))
def test_layer_budgets_follow_the_softmax_of_negative_variance(seed):
    g = torch.Generator().manual_seed(seed)
    n, length, budget = 8, 500, 100
    sigma = torch.rand(n, 1, generator=g) * 3
    request = LayerRequest(n - 1, n, torch.tensor([budget]), torch.tensor([length]), window=0)
    planned = D2OAllocator().plan(list(sigma), request)
    assert [int(planned[layer][0]) for layer in range(n)] == spec_budgets(sigma[:, 0].tolist(), length, 0.2)
    protected = D2OAllocator((0, 1, -1)).plan(list(sigma), request)
    assert [int(protected[layer][0]) for layer in (0, 1, n - 1)] == [length + 1] * 3


def test_merge_folds_evicted_rows_into_their_most_similar_kept_row():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0], [0.1, 0.9]]])  # (S=1, T=5, D=2)
    values = torch.arange(10.0).view(1, 5, 2)
    rows = PackedRows(1)
    rows.append({"keys": keys, "values": values, "positions": torch.arange(5).view(1, 5)})
    keep = torch.tensor([[True, True, False, False, False]])
    merge = Merge()
    merge.apply(rows, None, torch.zeros(1, 1, 5), keep)
    unit = keys[0] / keys[0].norm(dim=-1, keepdim=True)
    u = {e: (unit[e] @ unit[:2].T).max().item() for e in (2, 3, 4)}  # row 2 -> 0, row 4 -> 1, row 3 -> 0
    tau = sum(u.values()) / 3  # first compression: the mean similarity
    assert merge.threshold.tolist() == pytest.approx([tau])
    merged = {e for e in u if u[e] >= tau}
    assert merged == {2, 4}  # row 3 points away from everything and is dropped
    expected_k0 = (keys[0, 0] + u[2] * keys[0, 2]) / 2
    expected_v1 = (values[0, 1] + u[4] * values[0, 4]) / 2
    torch.testing.assert_close(rows.padded("keys")[0, 0], expected_k0)
    torch.testing.assert_close(rows.padded("values")[0, 1], expected_v1)
    assert rows.padded("positions")[0].tolist() == [0, 1]  # merged rows keep the kept row's position
    # the next compression moves the threshold by the EMA of the new mean similarity
    rows.append({"keys": keys[:, :2], "values": values[:, :2], "positions": torch.tensor([[5, 6]])})
    kept = rows.padded("keys")[0, :3]
    u_next = (keys[0, 1] @ (kept / kept.norm(dim=-1, keepdim=True)).T).max().item()  # row 6 is evicted
    merge.apply(rows, None, torch.zeros(1, 1, 4), torch.tensor([[True, True, True, False]]))
    assert merge.threshold.item() == pytest.approx(0.5 * tau + 0.5 * u_next, abs=1e-6)


def test_d2o_evicts_and_merges_while_decoding():
    model = tiny_model("qwen2", num_hidden_layers=6, seed=0)
    ids, _ = left_padded_batch([300], seed=18)
    cache = SqueezeCache(model, "d2o", 0.3)
    with torch.inference_mode():
        model(ids, cache=cache)
        after_prefill = cache.stored_rows().clone()
        keys_before = cache.layers[2].keys.clone()
        token = ids[:, -1:]
        for _ in range(4):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    assert torch.equal(cache.stored_rows(), after_prefill)  # one in, one out
    assert len(set(after_prefill[:, 0, 0].tolist())) > 1  # layers got different budgets
    assert cache.layers[0].kept_positions()[0][0][:4] == [0, 1, 2, 3]  # sinks forced in
    assert not torch.equal(cache.layers[2].keys[..., :-4, :], keys_before[..., :-4, :])  # some rows merged


def test_per_sequence_state_follows_batch_reordering():
    """D2O's merge threshold and PrefixKV's FIFO start are per sequence: beam reordering moves them."""
    model = tiny_model("llama", num_hidden_layers=2, seed=0)
    ids, mask = left_padded_batch([120, 90], seed=19)
    for method in ("d2o", "prefixkv"):
        cache = SqueezeCache(model, method, 0.3)
        with torch.inference_mode():
            model(ids, attention_mask=mask, cache=cache)
            model(ids[:, -1:], attention_mask=torch.ones(2, 121, dtype=torch.long), cache=cache)
        layer = cache.layers[0]
        state = layer.components.action.threshold if method == "d2o" else layer.components.scorer.frozen_below
        before = state.clone()
        cache.reorder_cache(torch.tensor([1, 0]))
        after = layer.components.action.threshold if method == "d2o" else layer.components.scorer.frozen_below
        assert after.tolist() == before.flip(0).tolist()


def test_scores_and_layer_statistic_share_one_walk_over_the_attention(monkeypatch):
    """D2O's accumulated scores and its attention variance read the same column sums, computed once."""
    from kvsqueeze.attention.observation import Observation
    from kvsqueeze.scorers.accumulated_attention import AccumulatedAttentionScorer

    b, h, h_kv, length, d = 1, 4, 2, 600, 8  # more than one SCORE_CHUNK of queries
    obs = random_prefill(0, b, h, h_kv, length, d)
    logits = obs.query @ obs.keys.repeat_interleave(h // h_kv, dim=1).transpose(-1, -2) * obs.scaling
    causal = torch.ones(length, length).triu(1).bool()
    column_sums = logits.masked_fill(causal, float("-inf")).softmax(-1).sum(dim=2)  # (B, H, T)
    calls = 0
    walk = Observation.probabilities

    def counted(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return walk(self, *args, **kwargs)

    monkeypatch.setattr(Observation, "probabilities", counted)
    scores = AccumulatedAttentionScorer().score(obs)
    chunks = calls
    D2OAllocator().layer_statistic(obs, scores)
    assert calls == chunks > 1  # the allocator reused the scorer's walk
    torch.testing.assert_close(scores, column_sums.view(b, h_kv, -1, length).mean(2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(obs.column_sums().flatten(1, 2), column_sums, rtol=1e-4, atol=1e-4)
