"""Prompts given as segments, and what a reuse policy hands back.

    reuse = KVReuse(model, tokenizer, policy="kvcomm")
    prompt = [Segment("You are a fact checker.\n"), Segment(document, shared=True), Segment("Q: ...")]
    prepared = reuse.prepare(prompt)
    model.generate(**prepared.generate_inputs(), max_new_tokens=32)   # or kvsqueeze.generate(..., prepared)

A segment is tokenized on its own and the prompt is the concatenation of its segments' ids (the full
recompute sees exactly the same ids). ``shared=True`` marks text that recurs across prompts (a document,
another agent's answer): its KV may come from the store. An ``id`` names a shared segment so later prompts
can refer to it by ``Segment(id=...)`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class Segment:
    """One piece of a prompt.

    Args:
        text: the text (empty when ``id`` names a segment stored before).
        shared: its KV may be reused from the store (implied by ``id``).
        id: a name for a shared segment; ``Segment(id=...)`` without text refers to it.
        slot: the placeholder it fills, for KVCOMM's anchor pools (default: its rank among the prompt's
            shared segments).
    """

    text: str = ""
    shared: bool = False
    id: str | None = None
    slot: str | None = None

    @property
    def is_shared(self) -> bool:
        return self.shared or self.id is not None


@dataclass
class Piece:
    """A segment after tokenization: its ids and where it sits in the prompt."""

    ids: torch.Tensor  # (T,)
    shared: bool
    start: int
    slot: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.ids.numel()


def split_tail(pieces: list[Piece], min_tokens: int) -> tuple[list[Piece], list[Piece]]:
    """(head, tail) of a prompt's pieces: the head ends with its last shared piece of at least ``min_tokens``
    tokens (a document), the tail is everything after it (a question, short answers, closing text). ``0``
    keeps every piece in the head; with no piece that long, everything is tail."""
    if not min_tokens:
        return pieces, []
    long = [i for i, p in enumerate(pieces) if p.shared and p.ids.numel() >= min_tokens]
    cut = long[-1] + 1 if long else 0
    return pieces[:cut], pieces[cut:]


@dataclass
class ReusedPrompt:
    """A prompt prepared for generation: its ids and a cache of all but its last token.

    ``model.generate(**prepared.generate_inputs())`` computes only the last prompt token (transformers
    skips what the cache holds); so does ``kvsqueeze.generate(model, tokenizer, prepared)``. Generating
    extends ``cache`` in place: prepare again for another generation.
    """

    input_ids: torch.Tensor  # (1, N)
    cache: DynamicCache  # holds positions 0..N-2
    reused_tokens: int  # prompt tokens whose KV came from stored segments (in layers past the first)
    recomputed_tokens: int  # prompt tokens run through the model (the last token included)
    policy: str
    seconds: float = 0.0  # wall time of prepare(): store look-ups, base KVs, assembly and recompute
    dense: bool = False  # served by a dense prefill (full recompute, or KVCOMM's fallback)
    details: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def reuse_ratio(self) -> float:
        """Share of the prompt's tokens whose KV was reused."""
        return self.reused_tokens / max(1, self.num_tokens)

    def generate_inputs(self) -> dict:
        """Keyword arguments for ``model.generate``: ids, mask and the cache."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": torch.ones_like(self.input_ids),
            "cache": self.cache,
        }

    def cache_nbytes(self) -> int:
        """Bytes the cache holds now, measured from its tensors."""
        return sum(
            t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
        )
