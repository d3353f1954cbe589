"""Normalized attention from probe queries (ZipCache, He et al., NeurIPS'24; spec B §1b).

H2O's accumulated attention ``a_i = sum_k A[k, i]`` favours early tokens: under the causal mask column
``i`` has only ``l - i`` non-zero entries. ZipCache divides by that count, ``p_i = a_i / (l - i)``, and
estimates it from a few *probe* queries instead of all ``l``: the last ``recent_ratio * l`` positions plus
``random_ratio * l`` earlier positions drawn at random (without repeats), so the main attention never has
to be materialized::

    p~_i = sum over probes k that can see i of A~[k, i]  /  |{probes k that can see i}|

summed over the query heads of each KV head (ZipCache's GQA rule), so the score is per (sequence, KV head).
After the prompt, a call's saliency is its last query's attention row, summed over the group and not
normalized: ZipCache's rule for the tokens of its streaming buffer.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kvsqueeze.attention.observation import SCORE_CHUNK, Observation
from kvsqueeze.scorers.base import Scorer


class NormalizedAttentionScorer(Scorer):
    """ZipCache's saliency: probe-query attention per row, normalized by how many probes can see the row."""

    name: ClassVar[str] = "normalized_attention"

    def __init__(self, recent_ratio: float = 0.05, random_ratio: float = 0.05, seed: int = 0) -> None:
        for label, ratio in (("recent_ratio", recent_ratio), ("random_ratio", random_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {ratio}")
        self.recent_ratio, self.random_ratio, self.seed = recent_ratio, random_ratio, seed

    def probe_indices(self, length: int) -> torch.Tensor:
        """Query indices of the probes among ``length`` queries: the recent ones and the random earlier ones."""
        recent = max(1, int(self.recent_ratio * length))
        earlier = length - recent
        count = min(int(self.random_ratio * length), earlier)
        gen = torch.Generator().manual_seed(self.seed)
        random = torch.randperm(earlier, generator=gen)[:count]
        return torch.cat([random.sort().values, torch.arange(earlier, length)])

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        if not obs.is_prefill:
            probs = obs.probabilities(obs.query_length - 1)  # (B, H_kv, g, 1, T')
            total = torch.zeros(obs.key_positions.shape, dtype=torch.float32, device=obs.keys.device)
            total[..., : probs.shape[-1]] = probs.sum(dim=(2, 3))
            return total
        key = (self.name, self.recent_ratio, self.random_ratio, self.seed)
        return obs.memoized(key, lambda: self._prompt_scores(obs))  # forks of one prefill share it

    def _prompt_scores(self, obs: Observation) -> torch.Tensor:
        """(B, H_kv, T) the prompt's normalized probe attention (see the module doc)."""
        idx = self.probe_indices(obs.query_length).to(obs.query.device)
        probes = dataclasses.replace(
            obs,
            query=obs.query[:, :, idx],
            query_positions=obs.query_positions[:, idx],
            query_valid=obs.query_valid[:, idx],
        )
        total = torch.zeros(obs.key_positions.shape, dtype=torch.float32, device=obs.keys.device)
        seen_by = torch.zeros_like(total)
        for start in range(0, idx.numel(), SCORE_CHUNK):
            stop = min(start + SCORE_CHUNK, idx.numel())
            probs = probes.probabilities(start, stop)  # (B, H_kv, g, qc, T')
            width = probs.shape[-1]
            total[..., :width] += probs.sum(dim=(2, 3))
            visible = probes.visibility(start, stop)[..., :width]  # (B, H_kv, qc, T')
            valid = probes.query_valid[:, None, start:stop, None]
            seen_by[..., :width] += (visible & valid).sum(dim=2)
        return total / seen_by.clamp_min(1)
