"""What every reuse policy does: build the cache of a prompt's tokens (all but the last) from segments."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvsqueeze.reuse.engine import Engine
from kvsqueeze.reuse.segments import Piece


@dataclass
class Built:
    """A policy's cache of the pieces' tokens and how each token's KV was obtained."""

    cache: DynamicCache
    reused: int  # tokens whose KV came from stored segments (past layer 0)
    recomputed: int  # tokens run through the model
    dense: bool = False
    details: dict = field(default_factory=dict)


class ReusePolicy(ABC):
    """A way to obtain the KV of a prompt given as pieces, reusing what the store holds."""

    name: str = "policy"

    @abstractmethod
    def build(self, engine: Engine, pieces: list[Piece], agent: str) -> Built:
        """The cache of ``pieces`` (contiguous, from position 0), for the prompt's ``agent`` (its template)."""

    def reset(self) -> None:  # noqa: B027 (stateless policies keep nothing)
        """Forget any state kept between prompts (KVCOMM's anchors)."""


class FullRecompute(ReusePolicy):
    """The reference: one dense prefill of the whole prompt, nothing reused."""

    name = "full"

    def build(self, engine: Engine, pieces: list[Piece], agent: str) -> Built:
        ids = [p.ids for p in pieces]
        flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        return Built(engine.prefill(flat), 0, flat.numel(), dense=True)
