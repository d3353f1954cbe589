"""Context-reconstruction scorer (KVzip, Kim et al., 2025, arXiv 2505.23416).

A row matters if the model needs it to repeat the context. After the prompt, the cache replays it: the model
reads "Repeat the previous context exactly." and then the context itself, one chunk at a time, on top of the
cached prompt. A row's score is the largest attention any replay query pays it (max over the replay's queries
and over the KV head's group of query heads). As in KVzip's code, the softmax of a chunk's replay runs over
the attention sinks, that chunk's rows and the replay's own rows only, so chunks do not compete for mass.

With ``plus`` (KVzip+, from the KVzap paper, Jegou et al., 2026, arXiv 2601.07891) a replay query's attention
counts in proportion to what the row writes and against how large the query's input is: each probability is
multiplied by ``||W_O v||`` (the row's value through that query head's slice of the output projection) and
divided by ``||h||`` (the norm of the hidden state the query entered attention with), before the max. A row
that draws attention but writes next to nothing then ranks low.

The scores do not depend on any question, so the compressed cache answers whatever comes next. The cache
drives the replay (:mod:`kvsqueeze.cache.replay`, it needs the model and the tokenizer); this module holds
the hyperparameters and the per-layer math, on plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.scorers.base import Scorer

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
REPLAY_CHUNK = 512  # replay queries per chunk of the score computation


@dataclass(frozen=True)
class ReplaySpan:
    """The prompt rows one replay round scores, per sequence: positions ``start <= p < end``."""

    start: torch.Tensor  # (B,) first position of the chunk being repeated
    end: torch.Tensor  # (B,) one past its last (start == end: nothing scored this round)
    sink_end: torch.Tensor  # (B,) rows before this position are attention sinks
    prompt_end: torch.Tensor  # (B,) one past the prompt's last position: rows from here are the replay's


class ReconstructionScorer(Scorer):
    """KVzip's scores, from a replay of the context that the cache runs after the prompt.

    Args:
        chunk_size: context tokens repeated per replay round (KVzip: 2048).
        sinks: the first ``sinks`` positions stay in every round's softmax (KVzip: 4).
        overlap: tokens of the previous chunk quoted to say where a later round starts (KVzip: 8).
        keep_header: if True the chat template's header (system prompt, user-turn opening) always stays;
            by default it is scored 0 like any row no replay repeats, so only the sinks of it stay (KVzip's
            code).
    """

    name: ClassVar[str] = "reconstruction"
    replays: ClassVar[bool] = True  # scored after the prompt by a replay, not during its attention

    def __init__(
        self,
        chunk_size: int = 2048,
        sinks: int = 4,
        overlap: int = 8,
        keep_header: bool = False,
        plus: bool = False,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size, self.sinks, self.overlap = chunk_size, sinks, overlap
        self.keep_header, self.plus = keep_header, plus
        self.needs_hidden_states = plus  # type: ignore[misc]  # KVzip+ divides by the input's norm

    @property
    def key(self) -> tuple[int, int, int, bool, bool]:
        """What the scores depend on: two scorers with the same key give the same scores."""
        return self.chunk_size, self.sinks, self.overlap, self.keep_header, self.plus

    def score(self, obs: Observation, state: torch.Tensor | None = None) -> torch.Tensor:
        raise ValueError("reconstruction scores come from a replay of the context, which the cache runs")

    def replay_scores(
        self, obs: Observation, span: ReplaySpan, output_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Max attention from this round's replay queries onto the chunk's rows, (B, H_kv, T) fp32.

        ``obs`` is a replay call: its keys are the cached prompt plus the replay rows appended so far. Rows
        outside the span score 0. ``output_weight`` is the layer's output projection ``W_O``, (D_model, H*D),
        which KVzip+ (``plus``) needs.
        """
        b, h, q, d = obs.query.shape
        h_kv, g = obs.num_kv_heads, obs.group_size
        kpos = obs.key_positions.long()  # (B, H_kv, T)
        start, end = span.start[:, None, None], span.end[:, None, None]
        in_chunk = (kpos >= start) & (kpos < end)
        sinks, replay = kpos < span.sink_end[:, None, None], kpos >= span.prompt_end[:, None, None]
        in_softmax = obs.key_valid & (in_chunk | sinks | replay)
        # only the rows in the softmax take part: gather them (in storage order) to (B, H_kv, A)
        width = int(in_softmax.sum(-1).max())
        columns = in_softmax.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., :width]
        kept = torch.gather(in_softmax, 2, columns)  # (B, H_kv, A): False where a segment has fewer
        kpos = torch.gather(kpos, 2, columns)
        keys_t = torch.gather(obs.keys, 2, columns[..., None].expand(-1, -1, -1, d)).float().transpose(-1, -2)
        all_queries_valid = bool(obs.query_valid.all())
        if self.plus:
            if obs.hidden_states is None or output_weight is None:
                raise ValueError("kvzip plus=True needs the attention's input and its output projection")
            values = torch.gather(obs.values, 2, columns[..., None].expand(-1, -1, -1, d))  # (B, H_kv, A, D)
            written = written_norms(output_weight, values, g)  # (B, H_kv, g, A)
            inverse_input_norm = obs.hidden_states.float().norm(dim=-1).clamp(min=1e-6).reciprocal()  # (B, q)
        best = torch.zeros(b, h_kv, width, dtype=torch.float32, device=keys_t.device)
        for s in range(0, q, REPLAY_CHUNK):
            e = min(q, s + REPLAY_CHUNK)
            queries = obs.query[:, :, s:e].float().reshape(b, h_kv, g * (e - s), d)  # heads of a group
            logits = (queries @ keys_t).view(b, h_kv, g, e - s, width) * obs.scaling  # (B, H_kv, g, qc, A)
            causal = kpos[:, :, None, :] <= obs.query_positions[:, None, s:e, None]  # (B, H_kv, qc, A)
            hidden = ~(kept[:, :, None, :] & causal)
            if not all_queries_valid:  # a padding query sees nothing (its row comes out all zero)
                hidden |= ~obs.query_valid[:, None, s:e, None]
            probs = (
                logits.masked_fill_(hidden[:, :, None], float("-inf")).softmax(dim=-1).nan_to_num_(nan=0.0)
            )
            if self.plus:  # weigh before the max: ||W_O v|| differs between the group's query heads
                probs *= inverse_input_norm[:, None, None, s:e, None]
                best = torch.maximum(best, (probs.amax(dim=3) * written).amax(dim=2))
            else:
                best = torch.maximum(best, probs.amax(dim=(2, 3)))
        scores = torch.zeros(b, h_kv, obs.keys.shape[2], dtype=torch.float32, device=keys_t.device)
        scores.scatter_(2, columns, best * kept)
        return scores * in_chunk


def written_norms(output_weight: torch.Tensor, values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``||W_O^(h) v||`` for every value row and query head of its group, (B, H_kv, g, T) fp32.

    ``output_weight`` is the output projection (D_model, H*D) whose column block ``h`` reads query head
    ``h``'s output; ``values`` (B, H_kv, T, D). Computed through each head's Gram matrix ``W^T W`` (D, D), so
    no (T, D_model) product is formed.
    """
    b, h_kv, t, d = values.shape
    blocks = output_weight.float().view(-1, h_kv, group_size, d)  # (D_model, H_kv, g, D)
    gram = torch.einsum("mkgd,mkge->kgde", blocks, blocks)  # (H_kv, g, D, D)
    v = values.float()
    squared = torch.einsum("bktd,kgde,bkte->bkgt", v, gram, v)
    return squared.clamp(min=0.0).sqrt()
