"""MPCache's static score: the most attention any late prompt query pays a row, averaged over heads.

Spec B §2(b) (MPCache's code, made scaled and causal as the spec recommends): the observation rows are the
last ``share`` of the prompt's queries (20%; 10% above 24,000 tokens); ``A = softmax(q K^T / sqrt(d))`` in
fp32 over the rows each query can see, ``A_bar`` its mean over all query heads, and a row's score is
``max_{k in W} A_bar[k, i]``. One score per row for the whole layer, so every KV head keeps the same rows.
The observation window's own rows score ``+inf`` (always kept). Queries are walked in chunks.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from kvsqueeze.attention.observation import SCORE_CHUNK, Observation
from kvsqueeze.scorers.base import Scorer

LONG_PROMPT = 24_000  # above this many tokens the observation window is ``long_share`` of the prompt


class ObservationPeakScorer(Scorer):
    """Peak head-mean attention from the last ``share`` of the prompt's queries, shared by the KV heads."""

    name: ClassVar[str] = "observation_peak"

    def __init__(self, share: float = 0.2, long_share: float = 0.1) -> None:
        if not (0 < share <= 1 and 0 < long_share <= 1):
            raise ValueError(f"observation shares must be in (0, 1], got {share} and {long_share}")
        self.share, self.long_share = share, long_share

    def window_sizes(self, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """Observation queries per sequence (B,) for prompts of ``prompt_lengths`` real tokens."""
        long = prompt_lengths > LONG_PROMPT
        share = torch.full(
            prompt_lengths.shape, self.share, dtype=torch.float64, device=prompt_lengths.device
        )
        share = share.masked_fill(long, self.long_share)
        return torch.ceil(prompt_lengths.double() * share - 1e-9).long().clamp(min=1)  # 0.2 * 100 is 20

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        b, h_kv, t = obs.key_positions.shape
        q = obs.query_length
        lengths = obs.query_valid.sum(-1)  # (B,) real prompt tokens (left padding first)
        window = self.window_sizes(lengths).minimum(lengths.clamp(min=1))  # (B,)
        first = q - window  # (B,) index of each sequence's first observation query
        peak = torch.zeros(b, t, dtype=torch.float32, device=obs.keys.device)
        start = max(0, int(first.min()))
        for s in range(start, q, SCORE_CHUNK):
            stop = min(s + SCORE_CHUNK, q)
            probs = obs.probabilities(s, stop)  # (B, H_kv, g, qc, T')
            mean = probs.mean(dim=(1, 2))  # (B, qc, T') over every query head
            index = torch.arange(s, stop, device=mean.device)
            in_window = index[None, :] >= first[:, None]  # (B, qc)
            chunk = mean.masked_fill(~in_window[..., None], 0.0).amax(dim=1)  # (B, T')
            peak[:, : chunk.shape[-1]] = torch.maximum(peak[:, : chunk.shape[-1]], chunk)
        window_start = obs.query_positions.gather(1, first.clamp(min=0)[:, None])  # (B, 1)
        scores = peak[:, None, :].expand(b, h_kv, t).clone()
        is_window = obs.key_positions >= window_start[:, :, None]
        return scores.masked_fill(is_window & obs.key_valid, math.inf)
