"""SnapKV, PyramidKV and StreamingLLM against references written here from the spec (§0, §5-§7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.cache import Budget, SqueezeLayer
from kvsqueeze.methods import PyramidKV, SnapKV, StreamingLLM

H, H_KV, D, L = 4, 2, 8, 64
G = H // H_KV


class FakeAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.layer_idx = G, True, 0


def snapkv_scores(q, k, window, kernel, pooling):
    """Spec §0: window softmax with causal mask on the last w x w block, summed, group mean, pooled."""
    scores = []
    for kv in range(H_KV):
        total = torch.zeros(L)
        for g in range(G):
            logits = q[kv * G + g, L - window :] @ k[kv].T / math.sqrt(D)  # (w, L)
            for i in range(window):
                logits[i, L - window + i + 1 :] = float("-inf")
            total += torch.softmax(logits, -1).sum(0) / G
        x = total[None, None]
        if pooling == "avg":
            pooled = F.avg_pool1d(x, kernel, 1, kernel // 2, count_include_pad=True)[0, 0]
        else:
            pooled = F.max_pool1d(x, kernel, 1, kernel // 2)[0, 0]
        scores.append(pooled[: L - window])
    return scores


def assert_top_k(kept, scores, window, keep):
    """Each head keeps its window plus a top-(keep - window) set of prefix scores (any order among ties)."""
    for head, prefix_scores in zip(kept, scores, strict=True):
        assert len(head) == keep and head == sorted(head)
        assert head[-window:] == list(range(L - window, L))
        chosen = torch.zeros(L - window, dtype=torch.bool)
        chosen[head[:-window]] = True
        assert prefix_scores[chosen].min() >= prefix_scores[~chosen].max()


def run_layer(method, budget, layer_idx=0, num_layers=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(H, L, D, generator=gen) * 2
    k = torch.randn(H_KV, L, D, generator=gen) * 2
    v = torch.randn(H_KV, L, D, generator=gen)
    layer = SqueezeLayer(
        method.components(), Budget.parse(budget), layer_idx=layer_idx, num_layers=num_layers
    )
    pos = torch.arange(L)[None]
    layer.update(k[None], v[None], kwargs={"position_ids": pos})
    layer.attend(FakeAttention(), q[None], None, D**-0.5, position_ids=pos)
    return q, k, layer.kept_positions()[0]


@pytest.mark.parametrize("kernel, pooling", [(5, "avg"), (7, "max"), (1, "avg")])
def test_snapkv_matches_reference(kernel, pooling):
    q, k, kept = run_layer(SnapKV(window=8, kernel=kernel, pooling=pooling), budget=24)
    assert_top_k(kept, snapkv_scores(q, k, 8, kernel, pooling), window=8, keep=24)


def test_pyramidkv_budgets_and_selection():
    n, capacity, window, beta = 4, 24, 4, 20.0
    k_bar = capacity - window
    low = int(k_bar // beta)
    high = 2 * k_bar - low  # 39 < L - w, so no capping
    step = (high - low) // (n - 1)
    for layer_idx in range(n):
        expected_keep = high - layer_idx * step + window
        q, k, kept = run_layer(
            PyramidKV(window=window, beta=beta), budget=capacity, layer_idx=layer_idx, num_layers=n
        )
        assert [len(h) for h in kept] == [expected_keep] * H_KV
        assert_top_k(kept, snapkv_scores(q, k, window, 7, "max"), window, expected_keep)


def test_streaming_llm_keeps_sinks_and_recent():
    _, _, kept = run_layer(StreamingLLM(sinks=4), budget=20)
    assert kept == [list(range(4)) + list(range(L - 16, L))] * H_KV
