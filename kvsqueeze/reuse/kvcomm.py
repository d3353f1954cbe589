"""KVCOMM (Ye et al., NeurIPS 2025, arXiv 2510.12872; spec B §3.3): reuse with measured offsets.

An agent's prompt interleaves its own fixed text (prefix segments) with placeholders filled by shared
content (a document, the question, other agents' answers). Shared text has a different KV under a
different prefix; KVCOMM keeps, per placeholder slot, a pool of *anchors*: contents whose real deviation
was measured by a dense prefill (``real - base`` over the placeholder, and ``real - template`` over the
agent's prefix segment right after it). New content gets the base KV (computed alone) plus a blend of the
anchors' deviations, weighted by how close its base KV is to each anchor's, and nothing but the last prompt
token is recomputed.

- Weights, separately for keys and values, temperature ``T``: per placeholder token
  ``softmax_n(-mean_{layers,heads,dims} |base(s)_t - E_n[t]| / T)`` over the anchors' first ``len(s)``
  tokens; for the following prefix segment, per (layer, head, channel),
  ``softmax_n(-||base(s) - E_n[last len(s)]||_2 / T)`` over the token axis. Layer 0 is left as it is
  (exact). Keys are compared and offset before RoPE (spec B §3.3 g), in fp32.
- Anchor prediction for new content: with ``p = softmax(-||V_base(s) - V_base(s_n)[:len(s)]||_2)`` over
  the anchors at least as long, ``s`` becomes a new anchor when the pool has at most one anchor, fewer
  than two are long enough, or the entropy ``H(p) > gamma * log2(N)``; otherwise the anchors in ``p``'s
  0.9 nucleus are activated (the code's quirk kept: when the top one alone passes 0.9, all are).
- A prompt with a new anchor (or content whose anchors hold no offsets for this agent yet) is prefilled
  densely, and the anchors in it record this agent's offsets; the agent's first dense prefill also records
  its template (the KV of its own segments). Pools keep at most ``max_anchors``; past that, the anchor
  with the fewest activations among the oldest ``window`` goes.

Content that is itself an anchor with this agent's offsets gets exactly those offsets. Defaults from the
official code (FastMAS/KVCOMM ``config.py``): ``gamma=0.3``, ``max_anchors=20``, ``window=5``,
``temperature=1``, ``top_p=0.9``.

Beyond the paper, ``recompute_tail=N`` assembles the prompt only up to its last shared segment of at least
``N`` tokens (a document) and computes everything after it (a question, short answers, the closing text) on
top of that, as a dense prefill would. Shared segments in that tail get no anchors. Why: a question's KV
computed alone, plus offsets measured on other questions, cannot hold what the question's tokens read from
*this* document in a dense prefill; on Qwen2.5-Coder-0.5B reusing it gives another project's access code
(docs/RESULTS.md, reuse). ``0`` (the default) is the paper: only the prompt's last token is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvsqueeze.reuse.base import Built, FullRecompute, ReusePolicy
from kvsqueeze.reuse.engine import Engine
from kvsqueeze.reuse.segments import Piece, split_tail
from kvsqueeze.reuse.store import SegmentKV, token_key

ENTROPY_EPS = 1e-40


@dataclass(frozen=True)
class KVCOMMConfig:
    """KVCOMM's parameters (defaults: the official code).

    Args:
        gamma: entropy threshold; content is new when ``H > gamma * log2(N)`` (``threshold`` 0.3).
        max_anchors: anchors kept per placeholder slot (``max_anchor_num`` 20).
        window: the oldest anchors an eviction chooses among (``window_size`` 5).
        temperature: of both offset weightings (1).
        top_p: the activation nucleus (0.9).
        delta_dtype: dtype the measured offsets are stored in (they are added in fp32).
        recompute_tail: 0 (the paper) computes only the last prompt token; N > 0 computes every token after
            the prompt's last shared segment of at least N tokens (see the module doc).
    """

    gamma: float = 0.3
    max_anchors: int = 20
    window: int = 5
    temperature: float = 1.0
    top_p: float = 0.9
    delta_dtype: torch.dtype = torch.float32
    recompute_tail: int = 0

    def __post_init__(self) -> None:
        if self.recompute_tail < 0:
            raise ValueError(f"kvcomm recompute_tail must be >= 0, got {self.recompute_tail}")
        if self.gamma < 0:
            raise ValueError(f"kvcomm gamma must be >= 0, got {self.gamma}")
        if self.max_anchors < 1 or self.window < 1:
            raise ValueError(
                f"kvcomm max_anchors and window must be >= 1, got {self.max_anchors}, {self.window}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"kvcomm needs temperature > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )


@dataclass
class Offsets:
    """One agent's measured deviations for one anchor (pre-RoPE keys, values)."""

    placeholder: SegmentKV  # real - base over the anchor's tokens
    prefix: SegmentKV | None  # real - template over the agent's segment right after it, if any


@dataclass
class Anchor:
    """Shared content whose real KV was measured: its base KV and each agent's offsets."""

    key: str
    base: SegmentKV  # E_n: (L, H_kv, n, D)
    offsets: dict[str, Offsets] = field(default_factory=dict)
    activations: int = 0

    @property
    def length(self) -> int:
        return self.base.num_tokens


class KVCOMM(ReusePolicy):
    """Anchor-based KV reuse across agents (see the module doc)."""

    name = "kvcomm"

    def __init__(self, config: KVCOMMConfig | None = None, **params: float) -> None:
        self.config = config or KVCOMMConfig(**params)
        if self.config.recompute_tail:  # its own label in reports
            self.name = f"kvcomm(recompute_tail={self.config.recompute_tail})"
        self.pools: dict[str, list[Anchor]] = {}
        self.templates: dict[str, dict[int, SegmentKV]] = {}  # agent -> piece index -> its real KV
        self.calls = 0
        self.reused_calls = 0

    def reset(self) -> None:
        self.pools.clear()
        self.templates.clear()
        self.calls = self.reused_calls = 0

    @property
    def reuse_rate(self) -> float:
        """Share of prompts served by reuse (the paper's reuse rate)."""
        return self.reused_calls / max(1, self.calls)

    def anchors(self, slot: str) -> list[Anchor]:
        """The anchor pool of a placeholder slot."""
        return self.pools.setdefault(slot, [])

    # ------------------------------------------------------------------ one prompt

    def build(self, engine: Engine, pieces: list[Piece], agent: str) -> Built:
        self.calls += 1
        head, tail = split_tail(pieces, self.config.recompute_tail)
        if not head:  # no shared segment long enough to reuse (or no tokens): a plain prefill
            return FullRecompute().build(engine, tail, agent)
        bases: dict[int, SegmentKV] = {}
        plans: dict[int, tuple[str, list[Anchor]]] = {}  # piece -> (exact | blend | new, anchors)
        dense = agent not in self.templates
        for i, piece in enumerate(head):
            if not piece.shared:
                continue
            bases[i], _ = engine.base_kv(piece.ids)
            plans[i] = self._plan(engine, piece, bases[i], agent)
            dense = dense or plans[i][0] == "new"
        if dense:
            return self._dense(engine, pieces, agent, bases, plans)
        self.reused_calls += 1
        cache = engine.empty_cache()
        template = self.templates[agent]
        for i, piece in enumerate(head):
            if piece.shared:
                kind, anchors = plans[i]
                delta = self._placeholder_delta(bases[i], anchors, agent, exact=kind == "exact")
                kv = add_offsets(bases[i], delta)
            else:
                kv = template[i]
                if i > 0 and head[i - 1].shared:
                    kind, anchors = plans[i - 1]
                    delta = self._prefix_delta(bases[i - 1], anchors, agent, exact=kind == "exact")
                    kv = add_offsets(kv, delta) if delta is not None else kv
            engine.append(cache, kv, piece.start)
        recomputed = engine.forward_pieces(tail, cache)
        return Built(
            cache, head[-1].end, recomputed, details={"anchors": {s: len(p) for s, p in self.pools.items()}}
        )

    def _plan(self, engine: Engine, piece: Piece, base: SegmentKV, agent: str) -> tuple[str, list[Anchor]]:
        pool = self.anchors(piece.slot)
        key = token_key(piece.ids, engine.header)
        own = next((a for a in pool if a.key == key), None)
        if own is not None:
            return ("exact" if agent in own.offsets else "new"), [own]
        if self._is_new_anchor(pool, base):
            return "new", []
        usable = [a for a in pool if a.length >= base.num_tokens and agent in a.offsets]
        return ("blend", usable) if usable else ("new", [])

    def _is_new_anchor(self, pool: list[Anchor], base: SegmentKV) -> bool:
        """KVCOMM's anchor prediction (module doc); activates the nucleus when the content is reusable."""
        n = base.num_tokens
        eligible = [a for a in pool if a.length >= n]
        if len(pool) <= 1 or len(eligible) <= 1:
            return True
        distance = torch.stack([(base.values - a.base.values[:, :, :n]).norm() for a in eligible])  # (N,)
        p = torch.softmax(-distance.float(), dim=0)
        entropy = -(p * (p + ENTROPY_EPS).log2()).sum()
        if float(entropy) > self.config.gamma * math.log2(len(eligible)):
            return True
        ranked, order = p.sort(descending=True)
        below = (ranked.cumsum(0) < self.config.top_p).nonzero().squeeze(-1)
        cutoff = int(below[-1]) if below.numel() else len(eligible) - 1
        for j in order[: cutoff + 1].tolist():
            eligible[j].activations += 1
        return False

    # ------------------------------------------------------------------ offsets

    def _placeholder_delta(
        self, base: SegmentKV, anchors: list[Anchor], agent: str, exact: bool
    ) -> SegmentKV:
        if exact:
            return anchors[0].offsets[agent].placeholder
        return placeholder_delta(
            base,
            [a.base for a in anchors],
            [a.offsets[agent].placeholder for a in anchors],
            self.config.temperature,
        )

    def _prefix_delta(
        self, base: SegmentKV, anchors: list[Anchor], agent: str, exact: bool
    ) -> SegmentKV | None:
        if exact:
            return anchors[0].offsets[agent].prefix
        usable = [a for a in anchors if a.offsets[agent].prefix is not None]
        if not usable:
            return None
        n = base.num_tokens
        parts = []
        for field_name in ("keys", "values"):
            mine = getattr(base, field_name).float()
            gaps = torch.stack(
                [(mine - getattr(a.base, field_name)[:, :, -n:].float()).norm(dim=2) for a in usable]
            )  # (N_a, L, H_kv, D)
            weights = torch.softmax(-gaps / self.config.temperature, dim=0)
            total = None
            for w, a in zip(weights, usable, strict=True):
                offset = getattr(a.offsets[agent].prefix, field_name).float()  # (L, H_kv, m, D)
                term = w[:, :, None, :] * offset
                total = term if total is None else total + term
            parts.append(total)
        return SegmentKV(*parts)

    # ------------------------------------------------------------------ dense fallback

    def _dense(
        self,
        engine: Engine,
        pieces: list[Piece],
        agent: str,
        bases: dict[int, SegmentKV],
        plans: dict[int, tuple[str, list[Anchor]]],
    ) -> Built:
        ids = torch.cat([p.ids for p in pieces])
        cache = engine.prefill(ids)
        template = self.templates.get(agent)
        if template is None:
            template = {i: engine.rows(cache, p.start, p.end) for i, p in enumerate(pieces) if not p.shared}
            self.templates[agent] = template
        for i, piece in enumerate(pieces):
            if i not in plans:  # own text, or shared text in a recomputed tail
                continue
            kind, anchors = plans[i]
            if kind == "blend":
                continue  # reusable content: no anchor of its own
            anchor = anchors[0] if anchors else self._add_anchor(piece, engine, bases[i])
            if agent in anchor.offsets:
                continue
            real = engine.rows(cache, piece.start, piece.end)
            prefix = None
            if i + 1 < len(pieces) and not pieces[i + 1].shared:
                nxt = pieces[i + 1]
                prefix = measured_offset(
                    engine.rows(cache, nxt.start, nxt.end), template[i + 1], self.config.delta_dtype
                )
            anchor.offsets[agent] = Offsets(measured_offset(real, bases[i], self.config.delta_dtype), prefix)
        n = pieces[-1].end if pieces else 0
        return Built(cache, 0, n, dense=True, details={"anchors": {s: len(p) for s, p in self.pools.items()}})

    def _add_anchor(self, piece: Piece, engine: Engine, base: SegmentKV) -> Anchor:
        pool = self.anchors(piece.slot)
        anchor = Anchor(token_key(piece.ids, engine.header), base)
        pool.append(anchor)
        if len(pool) > self.config.max_anchors:
            oldest = pool[: self.config.window]
            pool.remove(min(oldest, key=lambda a: a.activations))
        return anchor


def placeholder_delta(
    base: SegmentKV, anchor_bases: list[SegmentKV], anchor_offsets: list[SegmentKV], temperature: float = 1.0
) -> SegmentKV:
    """KVCOMM's offset for new content ``base`` (n tokens): per token, the anchors' offsets weighted by
    ``softmax(-mean_{layers,heads,dims} |base_t - anchor_base_t| / temperature)`` over the anchors, separately
    for keys and values (module doc). Anchors are at least n tokens long; fp32, ``(L, H_kv, n, D)``."""
    n = base.num_tokens
    parts = []
    for field_name in ("keys", "values"):
        mine = getattr(base, field_name).float()  # (L, H_kv, n, D)
        gaps = torch.stack(
            [
                (mine - getattr(a, field_name)[:, :, :n].float()).abs().mean(dim=(0, 1, 3))
                for a in anchor_bases
            ]
        )  # (N_a, n)
        weights = torch.softmax(-gaps / temperature, dim=0)  # (N_a, n)
        total = torch.zeros_like(mine)
        for w, offset in zip(weights, anchor_offsets, strict=True):
            total += w[None, None, :, None] * getattr(offset, field_name)[:, :, :n].float()
        parts.append(total)
    return SegmentKV(*parts)


def add_offsets(kv: SegmentKV, delta: SegmentKV) -> SegmentKV:
    """``kv + delta`` in fp32, layer 0 left as it is (exact)."""
    keys, values = kv.keys.float().clone(), kv.values.float().clone()
    keys[1:] += delta.keys[1:].float()
    values[1:] += delta.values[1:].float()
    return SegmentKV(keys, values)


def measured_offset(real: SegmentKV, base: SegmentKV, dtype: torch.dtype = torch.float32) -> SegmentKV:
    """KVCOMM's measured offset ``real - base`` (what a dense prefill computed minus the reused rows), taken
    in fp32 and stored in ``dtype``."""
    return SegmentKV(
        (real.keys.float() - base.keys.float()).to(dtype),
        (real.values.float() - base.values.float()).to(dtype),
    )
