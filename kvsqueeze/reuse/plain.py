"""Plain position-corrected reuse (PromptCache-style; spec B §3.1).

Each shared segment's KV was computed alone after the store's header; at use time it is placed at its
offset by one RoPE turn and nothing in it is recomputed. The prompt's own (non-shared) segments are run
through the model, in order, on top of what is cached before them. Layer 0 is exact; deeper layers of a
shared segment miss its attention to what precedes it in this prompt, the loss CacheBlend and KVCOMM repair.

Beyond PromptCache, ``recompute_tail=N`` reuses only up to the prompt's last shared segment of at least
``N`` tokens (a document) and computes everything after it (a question, short answers, closing text) over
it, as KVCOMM's option of the same name does (see ``kvcomm.py`` for why a question's own KV must read the
document). ``0`` (the default) reuses every shared segment.
"""

from __future__ import annotations

from kvsqueeze.reuse.base import Built, ReusePolicy
from kvsqueeze.reuse.engine import Engine
from kvsqueeze.reuse.segments import Piece, split_tail


class PlainReuse(ReusePolicy):
    """Shared segments from the store, RoPE-shifted; everything else recomputed.

    Args:
        recompute_tail: 0 reuses every shared segment; N > 0 computes every token after the prompt's last
            shared segment of at least N tokens (see the module doc).
    """

    name = "plain"

    def __init__(self, recompute_tail: int = 0) -> None:
        if recompute_tail < 0:
            raise ValueError(f"plain recompute_tail must be >= 0, got {recompute_tail}")
        self.recompute_tail = recompute_tail
        if recompute_tail:  # its own label in reports
            self.name = f"plain(recompute_tail={recompute_tail})"

    def build(self, engine: Engine, pieces: list[Piece], agent: str) -> Built:
        head, tail = split_tail(pieces, self.recompute_tail)
        cache = engine.empty_cache()
        reused = recomputed = 0
        for piece in head:
            if piece.shared:
                kv, _ = engine.base_kv(piece.ids)
                engine.append(cache, kv, piece.start)
                reused += piece.ids.numel()
            else:
                engine.forward(piece.ids, piece.start, cache)
                recomputed += piece.ids.numel()
        recomputed += engine.forward_pieces(tail, cache)
        return Built(cache, reused, recomputed, dense=not head)
