"""What a scorer sees of one attention call, and the fp32 attention math scorers share.

Everything here works on plain tensors (no transformers import). Attention probabilities are computed in
fp32, query chunk by query chunk, so a prefill of ``L`` tokens never materializes an ``L x L`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch

SCORE_CHUNK = 256  # queries per chunk when scorers walk over a whole prefill


@dataclass
class Observation:
    """One layer's attention call, as stored rows and new queries.

    Keys are the rows the cache holds *after* this call's tokens were appended (padded per segment).
    Positions are absolute token positions, so causality and sliding windows never depend on where a row
    sits in storage.
    """

    query: torch.Tensor  # (B, H, q, D) post-RoPE queries of this call
    query_positions: torch.Tensor  # (B, q) absolute positions
    query_valid: torch.Tensor  # (B, q) bool, False for left padding
    keys: torch.Tensor  # (B, H_kv, T, D) stored keys, padded per (b, h)
    values: torch.Tensor  # (B, H_kv, T, D)
    key_positions: torch.Tensor  # (B, H_kv, T) absolute positions (int32 or int64), -1 in padding slots
    key_valid: torch.Tensor  # (B, H_kv, T) bool
    scaling: float
    layer_idx: int
    num_layers: int
    sliding_window: int | None = None
    is_prefill: bool = True
    all_keys_valid: bool = False  # a hint: no padding slot in `keys` (lets masks be skipped)
    hidden_states: torch.Tensor | None = None  # (B, q, D_model) the attention's input, for learned scorers
    # what :meth:`memoized` computed (column sums, a scorer's prompt scores); not copied by
    # dataclasses.replace, so new rows mean new results
    _memo: dict[Hashable, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def group_size(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]

    @property
    def query_length(self) -> int:
        return self.query.shape[2]

    def visibility(
        self, start: int = 0, stop: int | None = None, first_head_only: bool = False
    ) -> torch.Tensor:
        """(B, H_kv or 1, qc, T) bool: which stored keys the queries ``start:stop`` may attend to."""
        heads = slice(0, 1) if first_head_only else slice(None)
        qp = self.query_positions[:, None, start:stop, None]  # (B, 1, qc, 1)
        kpos = self.key_positions[:, heads, None, :]  # (B, H_kv, 1, T)
        visible = self.key_valid[:, heads, None, :] & (kpos <= qp)
        if self.sliding_window is not None:
            visible &= kpos > qp - self.sliding_window
        return visible

    def visible_prefix(self, start: int = 0, stop: int | None = None) -> int:
        """How many leading stored rows queries ``start:stop`` can see at most.

        Rows are stored in temporal order, so the rows at or before the chunk's last position form a prefix;
        a causal chunk of a long prefill then skips the keys after it.
        """
        newest = self.query_positions[:, start:stop].max()
        return int((self.key_valid & (self.key_positions <= newest)).sum(-1).max())

    def probabilities(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """fp32 softmax attention of queries ``start:stop`` over the stored keys they can see.

        Returns (B, H_kv, g, qc, T') over the first ``T' = visible_prefix(start, stop)`` stored rows (the
        rows after them are invisible to these queries). Rows of padding queries are all zero.
        """
        b, h, _, d = self.query.shape
        stop = self.query_length if stop is None else min(stop, self.query_length)
        # The newest query of a call sees every stored row; a single such query needs no mask at all.
        everything_visible = stop == self.query_length and self.all_keys_valid and self.sliding_window is None
        width = self.keys.shape[2] if everything_visible else self.visible_prefix(start, stop)
        q = self.query[:, :, start:stop].float()  # (B, H, qc, D)
        qc = q.shape[2]
        q = q.view(b, self.num_kv_heads, self.group_size, qc, d)
        keys = self.keys[:, :, :width].float()  # (B, H_kv, T', D)
        logits = torch.einsum("bkgqd,bktd->bkgqt", q, keys) * self.scaling
        if not (everything_visible and qc == 1):
            visible = self.visibility(start, stop)[..., :width][:, :, None]  # (B, H_kv, 1, qc, T')
            logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        qvalid = self.query_valid[:, start:stop][:, None, None, :, None]
        return torch.nan_to_num(probs, nan=0.0) * qvalid

    def probability_chunks(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Yield :meth:`probabilities` over queries ``start:`` in chunks of ``SCORE_CHUNK`` queries."""
        for s in range(start, self.query_length, SCORE_CHUNK):
            yield self.probabilities(s, min(s + SCORE_CHUNK, self.query_length))

    def column_sums(self, start: int = 0) -> torch.Tensor:
        """Attention each stored row received from queries ``start:``, per query head: (B, H_kv, g, T) fp32.

        Computed once per ``start`` and kept on this observation, so a scorer and an allocator that both
        need it (D2O's accumulated scores and attention variance) walk the attention once. Treat as read-only.
        """

        def walk() -> torch.Tensor:
            b, h_kv, t = self.key_positions.shape
            sums = torch.zeros(b, h_kv, self.group_size, t, dtype=torch.float32, device=self.keys.device)
            for probs in self.probability_chunks(start):  # (B, H_kv, g, qc, T')
                sums[..., : probs.shape[-1]] += probs.sum(dim=3)
            return sums

        return self.memoized(("column_sums", start), walk)

    def memoized(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, once per ``key`` on this observation (and on every observation sharing its memo:
        forks of one recorded prefill with ``reuse_attention``). Treat the result as read-only."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def share_memo(self, other: Observation) -> None:
        """Share ``other``'s memo when both hold the same rows (a fork's rows before any eviction)."""
        if self.key_positions.shape == other.key_positions.shape and torch.equal(
            self.key_positions, other.key_positions
        ):
            self._memo = other._memo

    def last_queries(self, count: int) -> int:
        """Index of the first of the last ``count`` queries of this call."""
        return max(0, self.query_length - count)
