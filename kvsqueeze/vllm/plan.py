"""What the connector's scheduler side decides, free of vLLM: which rows of a prompt it can load, and which
rows of a computed prompt it keeps.

Two kinds of stored rows, both keyed by token hashes:

- a **segment**: shared text (a document) whose KV was computed once in some prompt. It is stored with its
  keys turned back to before RoPE, so it can be placed at any offset of another prompt by one RoPE turn
  (plain position-corrected reuse, spec B §3.1). A segment is found in a new prompt by its tokens.
- a **prefix**: the exact KV of a prompt's first ``s`` tokens, ``s`` being where a segment starts in it (an
  agent's own header, shorter than vLLM's 128-token blocks, so vLLM's prefix cache cannot hold it). Stored
  after RoPE as computed: the same tokens at the same positions have the same KV.

A prompt ``P`` whose first ``c`` tokens vLLM holds (its prefix-cache hit) gets ``[c, E)`` loaded when a
stored segment starts at ``s`` and the prefix record of ``P[:s]`` exists (or ``s <= c``): the prefix rows
``[c, s)``, then the segment and any stored segments right after it, up to ``E`` (at most ``len(P) - 1``:
vLLM computes at least the last token). vLLM computes everything after ``E`` over the loaded rows, as
kvsqueeze's ``plain(recompute_tail=N)`` does. A prompt that gets nothing loaded is computed by vLLM, and the
connector keeps the rows a later prompt could load: the prefix before its first stored segment, and the
spans the request marks as shared (``kv_transfer_params={"kvsqueeze": {"share": [[start, end], ...]}}``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FIND_WINDOW = 8
"""Tokens a segment is looked up by (its first ``FIND_WINDOW``); shorter segments are not stored."""


def rows_key(kind: str, ids: Sequence[int]) -> str:
    """The store key of ``ids`` as a segment (``kind="s"``) or as a prompt prefix (``kind="p"``)."""
    digest = hashlib.sha256(kind.encode())
    digest.update(b"|")
    digest.update(",".join(map(str, ids)).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Placement:
    """Stored rows ``rows`` of ``key`` written at prompt positions ``start .. start + len(rows)``.

    With ``anchors`` (KVCOMM), the segment gets the offsets ``agent`` measured on those segments, blended.
    """

    kind: Literal["prefix", "segment"]
    key: str
    start: int
    rows: tuple[int, int]  # [first, end) of the stored rows
    anchors: tuple[str, ...] = ()  # segment keys whose offsets after this agent's text were measured
    agent: str = ""  # the prefix key of the text before the segment

    @property
    def num_tokens(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def end(self) -> int:
        """The prompt position after the last row written."""
        return self.start + self.num_tokens


@dataclass(frozen=True)
class Keep:
    """Prompt rows ``[start, end)`` to store under ``key`` once vLLM has computed them.

    An ``anchor`` keep stores the rows minus the stored segment ``base`` placed there: the offset KVCOMM
    measures for the ``agent`` whose text precedes them.
    """

    kind: Literal["prefix", "segment", "anchor"]
    key: str
    start: int
    end: int
    base: str = ""
    agent: str = ""


def anchor_key(segment: str, agent: str) -> str:
    """The store key of the offsets of ``segment`` measured after the prefix ``agent``."""
    return f"a|{segment}|{agent}"


@dataclass
class RequestPlan:
    """What the connector does for one request: rows to load before its first step, rows to keep."""

    loads: list[Placement] = field(default_factory=list)
    keeps: list[Keep] = field(default_factory=list)

    @property
    def loaded_tokens(self) -> int:
        return sum(p.num_tokens for p in self.loads)


def shared_spans(params: dict[str, Any] | None, num_tokens: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` spans a request marks as shared, validated against its length.

    Read from ``params["kvsqueeze"]["share"]`` (``kv_transfer_params`` of the request); a one-line
    ``ValueError`` for a malformed value.
    """
    if not params or "kvsqueeze" not in params:
        return []
    ours = params["kvsqueeze"]
    if not isinstance(ours, dict):
        raise ValueError('kv_transfer_params["kvsqueeze"] must be a dict')
    spans = ours.get("share", [])
    if not isinstance(spans, list):
        raise ValueError('kv_transfer_params["kvsqueeze"]["share"] must be a list of [start, end] pairs')
    out = []
    for span in spans:
        if (
            not isinstance(span, list | tuple)
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
            or not 0 <= span[0] < span[1] <= num_tokens
        ):
            raise ValueError(
                f"a shared span must be [start, end] with 0 <= start < end <= {num_tokens}: {span}"
            )
        if span[1] - span[0] < FIND_WINDOW:
            raise ValueError(f"a shared span needs at least {FIND_WINDOW} tokens: {span}")
        out.append((span[0], span[1]))
    return sorted(out)


POLICIES = ("plain", "kvcomm")


class ReuseIndex:
    """The scheduler side's view of what is stored: segments by their first tokens, prefixes by hash, and
    (``policy="kvcomm"``) which segments have offsets measured after which agent's text.

    It learns of rows only once the request that computed them has finished (:meth:`add`), so a prompt is
    never planned against rows a worker is still writing.

    Args:
        policy: ``plain`` places a found segment by RoPE alone; ``kvcomm`` adds KVCOMM's offsets (Ye et al.,
            NeurIPS'25; ``kvsqueeze.reuse.kvcomm``): an agent's first ``min_anchors`` prompts with a document
            are computed by vLLM and measured (anchors); later documents get the anchors' offsets blended by
            how close their stored KV is to each anchor's. Unlike the paper, a new document is never made an
            anchor by its entropy test (the scheduler holds no tensors): past ``min_anchors``, every document
            is reused.
        min_anchors: anchors an agent needs before its documents are reused (KVCOMM: a pool of one or none
            makes new content an anchor).
        max_anchors: anchors kept per agent, the oldest dropped first (KVCOMM's 20).
    """

    def __init__(self, policy: str = "plain", min_anchors: int = 2, max_anchors: int = 20) -> None:
        if policy not in POLICIES:
            raise ValueError(f"the connector's policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not 1 <= min_anchors <= max_anchors:
            raise ValueError(f"need 1 <= min_anchors <= max_anchors, got {min_anchors}, {max_anchors}")
        self.policy, self.min_anchors, self.max_anchors = policy, min_anchors, max_anchors
        self.segments: dict[str, tuple[int, ...]] = {}  # key -> token ids
        self.by_start: dict[tuple[int, ...], list[str]] = {}  # first FIND_WINDOW ids -> keys
        self.prefixes: set[str] = set()
        self.anchors: dict[str, list[str]] = {}  # agent (prefix key) -> segment keys with measured offsets

    def add(self, keep: Keep, ids: Sequence[int]) -> None:
        """Record that ``keep`` (rows of the prompt ``ids``) is now stored."""
        if keep.kind == "prefix":
            self.prefixes.add(keep.key)
            return
        if keep.kind == "anchor":
            measured = self.anchors.setdefault(keep.agent, [])
            if keep.base not in measured:
                measured.append(keep.base)
                del measured[: -self.max_anchors]
            return
        tokens = tuple(ids[keep.start : keep.end])
        if keep.key not in self.segments:
            self.segments[keep.key] = tokens
            self.by_start.setdefault(tokens[:FIND_WINDOW], []).append(keep.key)

    def discard(self, key: str) -> None:
        """Forget ``key`` (a worker no longer holds it)."""
        self.prefixes.discard(key)
        tokens = self.segments.pop(key, None)
        if tokens is not None:
            keys = self.by_start.get(tokens[:FIND_WINDOW], [])
            if key in keys:
                keys.remove(key)

    def find(self, ids: Sequence[int], start: int = 0) -> list[tuple[int, str]]:
        """Stored segments in ``ids`` at or after ``start``, left to right, without overlaps: (position, key).

        At each position the longest stored segment that matches wins.
        """
        found: list[tuple[int, str]] = []
        pos = start
        while pos + FIND_WINDOW <= len(ids):
            best = None
            for key in self.by_start.get(tuple(ids[pos : pos + FIND_WINDOW]), ()):
                tokens = self.segments[key]
                if tuple(ids[pos : pos + len(tokens)]) == tokens and (
                    best is None or len(tokens) > len(self.segments[best])
                ):
                    best = key
            if best is None:
                pos += 1
                continue
            found.append((pos, best))
            pos += len(self.segments[best])
        return found

    def _anchors(self, segment: str, agent: str) -> tuple[str, ...] | None:
        """KVCOMM's offsets for ``segment`` after ``agent``'s text: ``()`` with the plain policy, the
        anchors to blend, or ``None`` when the agent has too few anchors yet (vLLM computes and measures)."""
        if self.policy == "plain":
            return ()
        measured = self.anchors.get(agent, [])
        if segment in measured:
            return (segment,)
        n = len(self.segments[segment])
        usable = tuple(a for a in measured if a in self.segments and len(self.segments[a]) >= n)
        return usable if len(usable) >= self.min_anchors else None

    def plan(self, ids: Sequence[int], computed: int, shared: Sequence[tuple[int, int]] = ()) -> RequestPlan:
        """The plan of a prompt ``ids`` of which vLLM holds the first ``computed`` tokens (module doc).

        ``shared``: spans the request marks as shared; kept when computed and not stored yet.
        """
        plan = RequestPlan()
        limit = len(ids) - 1  # vLLM computes at least the last prompt token
        found = [(s, k) for s, k in self.find(ids) if s + len(self.segments[k]) > computed]
        if found:
            s, first_key = found[0]
            prefix = rows_key("p", ids[:s])
            if s > computed and prefix not in self.prefixes:  # vLLM computes it all; keep the text before
                plan.keeps.append(Keep("prefix", prefix, 0, s))
            elif (anchors := self._anchors(first_key, prefix)) is None:  # KVCOMM: measure this agent first
                n = len(self.segments[first_key])
                plan.keeps.append(Keep("anchor", anchor_key(first_key, prefix), s, s + n, first_key, prefix))
            else:
                if s > computed:
                    plan.loads.append(Placement("prefix", prefix, computed, (computed, s)))
                end = s
                for pos, key in found[: 1 if anchors else None]:  # KVCOMM corrects the first segment alone
                    if pos != end or end >= limit:
                        break  # a gap (own text between segments): vLLM computes from here
                    n = len(self.segments[key])
                    first = max(computed, pos) - pos
                    last = min(n, limit - pos)
                    plan.loads.append(
                        Placement(
                            "segment", key, pos + first, (first, last), anchors, prefix if anchors else ""
                        )
                    )
                    end = pos + last
        loaded_end = plan.loads[-1].end if plan.loads else computed
        for start, end in shared:
            key = rows_key("s", ids[start:end])
            if start >= loaded_end and key not in self.segments:
                plan.keeps.append(Keep("segment", key, start, end))
                if start > 0 and not plan.loads:
                    prefix = rows_key("p", ids[:start])
                    if prefix not in self.prefixes and all(k.key != prefix for k in plan.keeps):
                        plan.keeps.append(Keep("prefix", prefix, 0, start))
        return plan


def truncate_loads(loads: list[Placement], tokens: int) -> list[Placement]:
    """The first ``tokens`` rows of ``loads`` (vLLM may take fewer external tokens than offered)."""
    out = []
    for p in loads:
        if tokens <= 0:
            break
        n = min(p.num_tokens, tokens)
        out.append(Placement(p.kind, p.key, p.start, (p.rows[0], p.rows[0] + n), p.anchors, p.agent))
        tokens -= n
    return out
