"""``KVReuse``: prompts as segments in, a cache ``generate`` takes out, with reused/recomputed counts."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.reuse.base import FullRecompute, ReusePolicy
from kvsqueeze.reuse.cacheblend import CacheBlend
from kvsqueeze.reuse.engine import Engine
from kvsqueeze.reuse.kvcomm import KVCOMM
from kvsqueeze.reuse.plain import PlainReuse
from kvsqueeze.reuse.segments import Piece, ReusedPrompt, Segment
from kvsqueeze.reuse.store import SegmentStore, token_key

POLICIES: dict[str, type[ReusePolicy]] = {
    "full": FullRecompute,
    "plain": PlainReuse,
    "cacheblend": CacheBlend,
    "kvcomm": KVCOMM,
}


def get_policy(policy: str | ReusePolicy, **params: Any) -> ReusePolicy:
    """A policy by name (``full``, ``plain``, ``cacheblend``, ``kvcomm``) with its parameters, or as given."""
    if isinstance(policy, ReusePolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown reuse policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[policy](**params)


class KVReuse:
    """Build the KV cache of prompts whose segments recur, reusing the stored KV of shared segments.

    Args:
        model, tokenizer: a supported causal LM (llama, qwen2, mistral) and its tokenizer.
        policy: ``full`` (the reference: recompute everything), ``plain`` (position-corrected reuse),
            ``cacheblend`` or ``kvcomm``, or a built :class:`ReusePolicy`.
        store: the segment store (default: 1 GiB, unquantized); share one between instances to share KV.
        header: text every stored segment is computed after and that is then dropped, so its first tokens
            do not become an attention sink (default: the tokenizer's BOS token, else its EOS token).
        **params: the policy's parameters (``ratio=0.16`` for CacheBlend, ``gamma=0.3`` for KVCOMM,
            ``recompute_tail=64`` for plain reuse and KVCOMM, ...).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        policy: str | ReusePolicy = "kvcomm",
        *,
        store: SegmentStore | None = None,
        header: str | None = None,
        **params: Any,
    ) -> None:
        self.tokenizer = tokenizer
        self.policy = get_policy(policy, **params)
        if header is None:
            header = tokenizer.bos_token or tokenizer.eos_token or ""
        self.engine = Engine(model, store if store is not None else SegmentStore(), self._encode(header))

    @property
    def store(self) -> SegmentStore:
        return self.engine.store

    def _encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def add(self, text: str, id: str | None = None) -> str:
        """Compute and store the base KV of a shared segment now (e.g. a corpus, offline); returns its key."""
        ids = self._encode(text)
        if ids.numel() == 0:
            raise ValueError("a stored segment needs text")
        self._check_length(ids.numel() + self.engine.header.numel(), "segment")
        self.engine.base_kv(ids)
        key = token_key(ids, self.engine.header)
        if id is not None:
            self.store.name(id, key)
        return key

    def pieces(self, segments: Sequence[Segment | str]) -> list[Piece]:
        """The prompt's segments tokenized and placed (shared ones get their slot)."""
        if not segments:
            raise ValueError("the prompt has no segments")
        pieces: list[Piece] = []
        start = rank = 0
        for segment in segments:
            segment = Segment(segment) if isinstance(segment, str) else segment
            if not isinstance(segment, Segment):
                raise ValueError(f"a prompt segment must be a Segment or a str, got {type(segment).__name__}")
            if segment.text:
                ids = self._encode(segment.text)
                if segment.id is not None:
                    self.store.name(segment.id, token_key(ids, self.engine.header))
            elif segment.id is not None:
                ids = self.store.ids_of(self.store.resolve(segment.id))
            else:
                raise ValueError("a segment needs text or the id of a stored segment")
            if ids.numel() == 0:
                continue
            slot = (segment.slot or f"#{rank}") if segment.is_shared else None
            rank += int(segment.is_shared)
            pieces.append(Piece(ids, segment.is_shared, start, slot))
            start += ids.numel()
        if not pieces:
            raise ValueError("the prompt is empty")
        self._check_length(start, "prompt")
        return pieces

    def _check_length(self, tokens: int, what: str) -> None:
        limit = self.engine.max_positions
        if limit is not None and tokens > limit:
            raise ValueError(
                f"{what} of {tokens} tokens is longer than the model's context of {limit} positions"
            )

    def prepare(self, segments: Sequence[Segment | str], *, agent: str | None = None) -> ReusedPrompt:
        """The cache of a prompt given as segments, by this instance's policy.

        ``agent`` names the prompt's template for KVCOMM (default: a hash of its non-shared segments and
        where the shared ones sit, so prompts with the same own text are the same agent).
        """
        start_time = time.perf_counter()
        pieces = self.pieces(segments)
        ids = torch.cat([p.ids for p in pieces])
        agent = agent if agent is not None else _template_key(pieces)
        cached = _without_last_token(pieces)
        built = self.policy.build(self.engine, cached, agent)
        seconds = time.perf_counter() - start_time
        return ReusedPrompt(
            input_ids=ids[None].to(self.engine.model.device),
            cache=built.cache,
            reused_tokens=built.reused,
            recomputed_tokens=built.recomputed + 1,
            policy=self.policy.name,
            seconds=seconds,
            dense=built.dense,
            details=built.details,
        )


def _without_last_token(pieces: list[Piece]) -> list[Piece]:
    """The pieces the cache holds: all but the prompt's last token (``generate`` computes it)."""
    last = pieces[-1]
    head = pieces[:-1]
    if last.ids.numel() > 1:
        head.append(Piece(last.ids[:-1], last.shared, last.start, last.slot))
    return head


def _template_key(pieces: list[Piece]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(b"S" if piece.shared else b"P" + piece.ids.numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]
