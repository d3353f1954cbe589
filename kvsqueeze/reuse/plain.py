"""Plain position-corrected reuse (PromptCache-style; spec B §3.1).

Each shared segment's KV was computed alone after the store's header; at use time it is placed at its
offset by one RoPE turn and nothing in it is recomputed. The prompt's own (non-shared) segments are run
through the model, in order, on top of what is cached before them. Layer 0 is exact; deeper layers of a
shared segment miss its attention to what precedes it in this prompt, the loss CacheBlend and KVCOMM repair.
"""

from __future__ import annotations

from kvsqueeze.reuse.base import Built, ReusePolicy
from kvsqueeze.reuse.engine import Engine
from kvsqueeze.reuse.segments import Piece


class PlainReuse(ReusePolicy):
    """Shared segments from the store, RoPE-shifted; everything else recomputed. No parameters."""

    name = "plain"

    def build(self, engine: Engine, pieces: list[Piece], agent: str) -> Built:
        cache = engine.empty_cache()
        reused = recomputed = 0
        for piece in pieces:
            if piece.shared:
                kv, _ = engine.base_kv(piece.ids)
                engine.append(cache, kv, piece.start)
                reused += piece.ids.numel()
            else:
                engine.forward(piece.ids, piece.start, cache)
                recomputed += piece.ids.numel()
        return Built(cache, reused, recomputed)
