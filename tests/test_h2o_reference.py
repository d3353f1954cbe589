"""H2O against a reference written here from the spec (reference/eviction-methods.md §1), step by step.

The reference keeps a plain list of (position, score) per KV head: scores are column sums of the causal
prefill attention, mean over the GQA group; after prefill keep the last r rows and the top-k older rows by
score; each decode step adds the new query's attention row to every kept score, then evicts the lowest
older row once the budget is exceeded.
"""

from __future__ import annotations

import math

import torch

from kvsqueeze.cache import Budget, SqueezeLayer
from kvsqueeze.methods import H2O

B, H, H_KV, D = 1, 4, 2, 8
G = H // H_KV
PROMPT, STEPS, BUDGET = 14, 10, 6
RECENT = BUDGET // 2


class FakeAttention(torch.nn.Module):
    """The attributes the SDPA integration reads from an attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.num_key_value_groups = G
        self.is_causal = True
        self.layer_idx = 0


def reference_probs(q: torch.Tensor, keys: torch.Tensor, q_pos: list[int], k_pos: list[int]) -> torch.Tensor:
    """(H_kv, q, T) attention of queries over keys, causal by position, mean over each group."""
    out = []
    for kv in range(H_KV):
        heads = []
        for g in range(G):
            logits = q[kv * G + g] @ keys[kv].T / math.sqrt(D)  # (q, T)
            causal = torch.tensor([[kp <= qp for kp in k_pos] for qp in q_pos])
            heads.append(torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1))
        out.append(torch.stack(heads).mean(0))
    return torch.stack(out)


def keep_h2o(positions: list[int], scores: list[float]) -> list[int]:
    """Indices kept: last RECENT rows + top (BUDGET - RECENT) older rows by score, in temporal order."""
    if len(positions) <= BUDGET:
        return list(range(len(positions)))
    older = list(range(len(positions) - RECENT))
    heavy = sorted(older, key=lambda i: scores[i], reverse=True)[: BUDGET - RECENT]
    return sorted(heavy) + list(range(len(positions) - RECENT, len(positions)))


def test_h2o_kept_indices_match_reference_every_step():
    gen = torch.Generator().manual_seed(0)
    total = PROMPT + STEPS
    q_all = torch.randn(H, total, D, generator=gen)
    k_all = torch.randn(H_KV, total, D, generator=gen)
    v_all = torch.randn(H_KV, total, D, generator=gen)

    layer = SqueezeLayer(H2O().components(), Budget.parse(BUDGET), layer_idx=0, num_layers=1)
    module = FakeAttention()

    # ---- reference state: per KV head, kept positions and their scores
    ref_pos = [list(range(PROMPT)) for _ in range(H_KV)]
    probs = reference_probs(q_all[:, :PROMPT], k_all[:, :PROMPT], list(range(PROMPT)), list(range(PROMPT)))
    ref_score = [probs[h].sum(0).tolist() for h in range(H_KV)]
    for h in range(H_KV):
        keep = keep_h2o(ref_pos[h], ref_score[h])
        ref_pos[h] = [ref_pos[h][i] for i in keep]
        ref_score[h] = [ref_score[h][i] for i in keep]

    # ---- library: prefill
    pos = torch.arange(PROMPT)[None]
    layer.update(k_all[None, :, :PROMPT], v_all[None, :, :PROMPT], kwargs={"position_ids": pos})
    layer.attend(module, q_all[None, :, :PROMPT], None, D**-0.5, position_ids=pos)
    assert layer.kept_positions()[0] == ref_pos

    for step in range(STEPS):
        p = PROMPT + step
        for h in range(H_KV):
            ref_pos[h].append(p)
            ref_score[h].append(0.0)
            keys = k_all[h, ref_pos[h]]
            row = reference_probs(q_all[:, p : p + 1], k_all[:, ref_pos[h]], [p], ref_pos[h])[h, 0]
            ref_score[h] = [s + float(r) for s, r in zip(ref_score[h], row, strict=True)]
            keep = keep_h2o(ref_pos[h], ref_score[h])
            ref_pos[h] = [ref_pos[h][i] for i in keep]
            ref_score[h] = [ref_score[h][i] for i in keep]
            del keys
        pos = torch.tensor([[p]])
        layer.update(k_all[None, :, p : p + 1], v_all[None, :, p : p + 1], kwargs={"position_ids": pos})
        layer.attend(module, q_all[None, :, p : p + 1], None, D**-0.5, position_ids=pos)
        assert layer.kept_positions()[0] == ref_pos, f"step {step}"
        assert layer.get_seq_length() == p + 1  # logical length counts every token seen
