"""Select: keep every row, and let each decode step attend to a query-dependent few (Quest, MPCache).

Nothing is freed. The stored rows of each segment (one (sequence, KV head) pair) are cut into *pages* of
``page_size`` consecutive rows in storage order, which is temporal order; each page is summarized by the
per-channel minimum and maximum of its keys (post-RoPE, as the model attends them). At a one-token decode
step each KV head scores its pages against the query, keeps the best ones plus the first page (the
attention sinks) and the newest page (which holds the current token), and attention runs over the rows of
those pages only: they are gathered into a short tensor, no full-length score matrix is built or masked.

Two page scores (spec B, §4.1 and §2):

* ``"bound"`` (Quest): ``sum_i max(q_i M_i, q_i m_i)``, an upper bound of ``q . k`` for any key of the page,
  computed as ``q+ . M + q- . m``;
* ``"linear"`` (MPCache): ``q . (alpha M + (1 - alpha) m)``, one representative per page.

Either score can run on two levels (``coarse > 1``; MPCache's 32-token clusters over its 16-token pages):
clusters of ``coarse`` pages, whose bounds are kept beside the pages', are scored first; the best of them
(a share ``coarse_ratio`` of all, never fewer than the budget fills), the first and the newest make their
pages candidates, and only the candidates are scored and chosen from.

GQA: every head of a group reads the same rows. By default (``group="sum"``) a KV head's page score is the
sum of its query heads' scores (``q+`` and ``q-`` are summed over the group for the bound, ``q`` for the
linear score). With ``group="max"`` each query head's scores are taken relative to its own best page and a
page scores its best head's: ``max_h (s_h(p) - max_p' s_h(p'))``, so a page one head needs is not outvoted
by the others.

The page summaries are kept up to date as rows are appended: a decode step folds its new row into its page's
bounds in place; after several rows, the pages from the oldest changed one on are recomputed. When every
segment holds the same rows and budget (one sequence, an unpadded batch), a step's bookkeeping runs on Python
counts instead of per-segment tensors (:meth:`Select._rows_when_segments_agree`, the same pages): at long
contexts on a CPU the hundred small tensor ops it saves cost as much as the attention over the chosen rows.
Anything else that changes rows (an eviction, a merge, quantization) marks them stale and they are rebuilt.
They are stored in half precision (``bounds_dtype``): ranking pages needs no more (the brute-force
reference tests pick the same pages with fp16 and fp32 bounds), and a long context's step reads every bound
from memory, so half the bytes is about half the scoring time. The query is scaled to unit norm first, so an
fp16 score cannot overflow. Their bytes are counted with the cache's (:meth:`Select.nbytes`): a selecting
cache holds every row plus ``2 / page_size`` of its keys' count in fp16 bounds (``1 / page_size`` of an fp32
cache's key bytes; ``1 / (page_size * coarse)`` more for the clusters' bounds).

Plain PyTorch: no transformers import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvsqueeze.attention.observation import Observation

SCORES = ("bound", "linear")
GROUP_REDUCTIONS = ("sum", "max")
BOUNDS_DTYPES = {"float16": torch.float16, "float32": torch.float32}
HALF_MAX = torch.finfo(torch.float16).max


@dataclass
class PageIndex:
    """Per-channel key bounds of every page of every segment, as of the rows ``covered``.

    The bounds live in buffers with room for a few more pages (``GROWTH``), so a decode step writes its
    newest page in place instead of copying every bound; :meth:`nbytes` counts the buffers as allocated.
    """

    page_size: int
    clusters: PageIndex | None = None  # the same bounds over clusters of pages (a two-level choice), or None
    dtype: torch.dtype = torch.float16  # of the stored bounds
    covered: torch.Tensor | None = None  # (S,) rows the bounds summarize
    last_slot: torch.Tensor | None = None  # (S, 1) slot of the last summarized row (0 for an empty segment)
    last_position: torch.Tensor | None = None  # (S, 1) the position stored there when it was summarized
    covered_all: int | None = None  # the rows every segment's bounds cover, when that is one count
    pages: int = 0  # pages of the longest segment
    _buffer: torch.Tensor | None = None  # (S, capacity, 2, D): per-channel maxima, then minima, of each page

    GROWTH = 1 / 16  # spare pages allocated when the buffers grow, as a share of the pages (at least 4)

    @property
    def kmin(self) -> torch.Tensor | None:
        """(S, P, D) per-channel minimum of each page's keys (0 for pages past a segment's rows)."""
        return None if self._buffer is None else self._buffer[:, : self.pages, 1]

    @property
    def kmax(self) -> torch.Tensor | None:
        """(S, P, D) per-channel maximum of each page's keys."""
        return None if self._buffer is None else self._buffer[:, : self.pages, 0]

    @property
    def bounds(self) -> torch.Tensor | None:
        """(S, P, 2D) each page's maxima, then its minima: one row per page, so a score is one product."""
        return None if self._buffer is None else self._buffer[:, : self.pages].flatten(2)

    def nbytes(self) -> int:
        """Bytes of the stored bounds (the metadata selection adds to the rows it keeps), clusters' included."""
        own = 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()
        return own + (self.clusters.nbytes() if self.clusters is not None else 0)

    @property
    def per_cluster(self) -> int:
        """Pages per cluster (1 without clusters)."""
        return 1 if self.clusters is None else self.clusters.page_size // self.page_size

    def pages_of(self, clusters: torch.Tensor) -> torch.Tensor:
        """The :attr:`bounds` (S, K * per_cluster, 2D) of every page of the given clusters (S, K) (each below
        the buffer's capacity in clusters), page after page in the clusters' order.

        A cluster's pages are adjacent in the buffer, so each is one contiguous block to copy.
        """
        s, capacity, _, d = self._buffer.shape
        c = self.per_cluster
        first = (capacity // c) * torch.arange(s, device=clusters.device)[:, None]  # (S, 1) segments' first
        flat = (clusters + first).view(-1)  # (S * K,) clusters of c pages in the buffer seen as (S * C, c*2D)
        return self._buffer.view(-1, c * 2 * d).index_select(0, flat).view(s, -1, 2 * d)

    def invalidate(self) -> None:
        """Forget what the bounds cover: the next :meth:`refresh` recomputes every page (and cluster)."""
        self.covered, self.covered_all = None, None
        if self.clusters is not None:
            self.clusters.invalidate()

    def is_current(self, positions: torch.Tensor, lengths: torch.Tensor) -> bool:
        """True when the summarized rows are still the first ``covered`` rows of every segment (their last
        slot holds the position it held, which any eviction or merge before it changes)."""
        if (
            self.covered is None
            or self.covered.shape != lengths.shape
            or bool((lengths < self.covered).any())
        ):
            return False
        return bool(self._last_rows_unchanged(positions).all())

    def _last_rows_unchanged(self, positions: torch.Tensor) -> torch.Tensor:
        """(S,) whether each segment's last summarized slot still holds the position it held."""
        return positions.gather(1, self.last_slot)[:, 0] == self.last_position[:, 0]

    def _storable(self, bounds: torch.Tensor) -> torch.Tensor:
        """``bounds`` in the stored dtype; values past fp16's range (none seen in practice) saturate."""
        if self.dtype == torch.float16 and bounds.dtype != torch.float16:
            bounds = bounds.clamp(-HALF_MAX, HALF_MAX)
        return bounds.to(self.dtype)

    def refresh(self, keys: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        """Bring the bounds up to date with the stored rows: keys (S, T, D), positions (S, T), lengths (S,).

        Pages before the oldest one that gained rows are kept as they are; the others are recomputed.
        """
        if self.clusters is not None:
            self.clusters.refresh(keys, positions, lengths)
        s, _, d = keys.shape
        size = self.page_size
        longest = int(lengths.max()) if s else 0
        pages = max(1, -(-longest // size))
        if self._append_one_row(keys, positions, lengths, pages):
            return
        first = 0
        if self.is_current(positions, lengths):
            first = min(int(self.covered.min()) // size, self.pages)
        start, stop = first * size, pages * size
        chunk = keys[:, start:stop]  # (S, n * size or less, D)
        width = stop - start
        if chunk.shape[1] < width:  # the padded view ends at the longest segment's last row
            chunk = torch.cat([chunk, chunk.new_zeros(s, width - chunk.shape[1], d)], dim=1)
        chunk = chunk.view(s, -1, size, d)  # (S, n, size, D)
        slot = torch.arange(start, stop, device=keys.device).view(1, -1, size, 1)
        valid = slot < lengths.view(s, 1, 1, 1)  # (S, n, size, 1)
        low = chunk.masked_fill(~valid, float("inf")).amin(dim=2)  # (S, n, D)
        high = chunk.masked_fill(~valid, float("-inf")).amax(dim=2)
        empty = ~valid.any(dim=2)  # (S, n, 1): pages past a segment's end
        low, high = low.masked_fill(empty, 0), high.masked_fill(empty, 0)
        fits = self._buffer is not None and self._buffer.shape[0] == s and self._buffer.shape[1] >= pages
        if fits and self._buffer.is_inference() and not torch.is_inference_mode_enabled():
            fits = False  # built under inference_mode (a prefill), updated outside it: copy once
        if not fits:
            capacity = pages + max(4, int(pages * self.GROWTH))
            capacity = -(-capacity // self.per_cluster) * self.per_cluster  # whole clusters: see pages_of
            old = self._buffer
            self._buffer = keys.new_zeros(s, capacity, 2, d, dtype=self.dtype)
            if first > 0:
                self._buffer[:, :first] = old[:, :first]
        self._buffer[:, first:pages, 0] = self._storable(high)
        self._buffer[:, first:pages, 1] = self._storable(low)
        self._covers(positions, lengths, pages, longest if s and int(lengths.min()) == longest else None)

    def _covers(self, positions: torch.Tensor, lengths: torch.Tensor, pages: int, every: int | None) -> None:
        """Note that the bounds now summarize the first ``lengths`` rows (``pages`` pages); ``every``: the
        count when all of ``lengths`` are that count (None: they differ)."""
        self.pages = pages
        self.covered = lengths.clone()
        self.last_slot = (lengths - 1).clamp(min=0)[:, None]
        self.last_position = positions.gather(1, self.last_slot)
        self.covered_all = every

    def append_row(self, keys: torch.Tensor, positions: torch.Tensor) -> bool:
        """A decode step's update when every segment holds the same ``T`` rows (keys (S, T, D), positions
        (S, T)) and the bounds cover the first ``T - 1`` of each: row ``T - 1`` is folded into its page's
        bounds (or opens a page) in place, with no per-segment bookkeeping. Returns False, changing
        nothing, when that is not the case (then :meth:`refresh` applies)."""
        s, t, d = keys.shape
        newest, buffer = t - 1, self._buffer
        page = newest // self.page_size
        if self.covered_all != newest or self.clusters is not None or newest < 1:
            return False
        if buffer.shape[0] != s or page >= buffer.shape[1]:
            return False
        if buffer.is_inference() and not torch.is_inference_mode_enabled():
            return False
        if not bool(self._last_rows_unchanged(positions).all()):
            return False
        row = keys[:, newest]  # (S, D)
        bounds = buffer[:, page]  # (S, 2, D), a view of the buffer
        if newest % self.page_size:  # the row joins its page
            bounds[:, 0] = self._storable(torch.maximum(bounds[:, 0].float(), row))
            bounds[:, 1] = self._storable(torch.minimum(bounds[:, 1].float(), row))
        else:  # the row opens a page
            bounds[:, 0] = bounds[:, 1] = self._storable(row)
        self.pages = page + 1
        self.covered = torch.full_like(self.covered, t)
        self.last_slot = self.last_slot.new_full((s, 1), newest)
        self.last_position = positions[:, newest:t].clone()
        self.covered_all = t
        return True

    def _append_one_row(
        self, keys: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, pages: int
    ) -> bool:
        """A decode step's update in place: when the bounds cover every row but each segment's newest (at
        most one new row per segment) and the buffer has room, fold that row into its page's bounds (or
        open a page with it). Returns False, changing nothing, when that is not the case."""
        buffer, covered = self._buffer, self.covered
        if buffer is None or covered is None or covered.shape != lengths.shape or pages > buffer.shape[1]:
            return False
        if buffer.is_inference() and not torch.is_inference_mode_enabled():
            return False
        grown = lengths - covered  # (S,)
        appended, every_one = torch.stack(
            [((grown.clamp(0, 1) == grown) & self._last_rows_unchanged(positions)).all(), (grown == 1).all()]
        ).tolist()
        if not appended:
            return False
        s, _, d = keys.shape
        newest = (lengths - 1).clamp(min=0)  # (S,) the new row's slot (where a segment grew)
        row = keys.gather(1, newest.view(s, 1, 1).expand(s, 1, d))[:, 0]  # (S, D)
        capacity = buffer.shape[1]
        slot = torch.arange(0, s * capacity, capacity, device=keys.device) + newest // self.page_size
        flat = buffer.view(s * capacity, 2 * d)  # (S * capacity, 2D): a page's bounds per row
        old = flat.index_select(0, slot).view(s, 2, d).float()
        opens = (newest % self.page_size == 0)[:, None]  # the row starts its page
        bounds = torch.stack(
            [
                torch.where(opens, row, torch.maximum(old[:, 0], row)),
                torch.where(opens, row, torch.minimum(old[:, 1], row)),
            ],
            dim=1,
        )  # (S, 2, D)
        if not every_one:  # segments that did not grow keep their bounds
            bounds = torch.where((grown > 0)[:, None, None], bounds, old)
        flat.index_copy_(0, slot, self._storable(bounds.view(s, 2 * d)))
        every = self.covered_all + 1 if every_one and self.covered_all is not None else None
        self._covers(positions, lengths, pages, every)
        return True


@dataclass
class Select:
    """Query-aware page selection over every stored row (see the module docstring).

    Args:
        page_size: rows per page (Quest 16; MPCache's fine clusters 16).
        score: ``"bound"`` (Quest) or ``"linear"`` (MPCache, weight ``alpha`` on the maximum).
        alpha: MPCache's weight of the per-channel maximum (0.6).
        coarse: pages per coarse cluster for a hierarchy (MPCache: 2, i.e. 32 tokens); 1 = one level.
        coarse_ratio: share of coarse clusters whose pages stay eligible (MPCache's rho_1 = 0.5).
        dense_layers: the first layers attend to every row (Quest: 2).
        min_pages: at least this many pages per step (Quest's code: 3).
        group: how a GQA group's query heads score a page together, ``"sum"`` or ``"max"`` (module doc).
        bounds_dtype: ``"float16"`` (default) or ``"float32"`` page bounds (module doc).
        ratio, tokens: the selection budget, tokens attended per step: a ratio of the prompt or a count;
            both None: the cache's budget.
    """

    page_size: int = 16
    score: str = "bound"
    alpha: float = 0.6
    coarse: int = 1
    coarse_ratio: float = 1.0
    dense_layers: int = 0
    min_pages: int = 3
    group: str = "sum"
    bounds_dtype: str = "float16"
    ratio: float | None = None
    tokens: int | None = None
    index: PageIndex | None = field(default=None, repr=False)
    token_budget: torch.Tensor | None = field(default=None, repr=False)  # (B,) tokens attended per step
    common_budget: int | None = field(default=None, repr=False)  # token_budget when all share one

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"page score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.group not in GROUP_REDUCTIONS:
            raise ValueError(
                f"group reduction must be one of {', '.join(GROUP_REDUCTIONS)}, got {self.group!r}"
            )
        if self.bounds_dtype not in BOUNDS_DTYPES:
            raise ValueError(
                f"bounds_dtype must be one of {', '.join(BOUNDS_DTYPES)}, got {self.bounds_dtype!r}"
            )
        if self.page_size < 1 or self.coarse < 1 or self.min_pages < 2:
            raise ValueError("page_size and coarse must be >= 1 and min_pages >= 2")

    # ------------------------------------------------------------------ state

    def active(self, layer_idx: int) -> bool:
        """Whether this layer selects (the first ``dense_layers`` attend densely)."""
        return layer_idx >= self.dense_layers

    def set_budget(self, prompt_lengths: torch.Tensor, cache_budget: torch.Tensor) -> None:
        """Fix the tokens each step attends to per sequence (B,), from the prompt's real lengths (B,) and
        the cache's budget in tokens (B,)."""
        if self.tokens is not None:
            self.token_budget = torch.full_like(prompt_lengths, self.tokens)
        elif self.ratio is not None:
            self.token_budget = torch.ceil(prompt_lengths.double() * self.ratio).long().clamp(min=1)
        else:
            self.token_budget = cache_budget.clone()
        self._note_common_budget()

    def _note_common_budget(self) -> None:
        if self.token_budget.numel() == 0:
            self.common_budget = None
            return
        low, high = self.token_budget.aminmax()
        self.common_budget = int(low) if bool(low == high) else None

    def invalidate(self) -> None:
        """Rows changed other than by appending (eviction, merge, quantization): rebuild the bounds."""
        if self.index is not None:
            self.index.invalidate()

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep sequences ``indices``; the bounds are rebuilt at the next step."""
        if self.token_budget is not None:
            self.token_budget = self.token_budget[indices]
            self._note_common_budget()
        self.index = None

    def nbytes(self) -> int:
        return 0 if self.index is None else self.index.nbytes()

    def refresh(self, keys: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> PageIndex:
        """The page bounds of the stored rows (keys (S, T, D), positions (S, T), lengths (S,)), updated."""
        if self.index is None:
            dtype = BOUNDS_DTYPES[self.bounds_dtype]
            clusters = PageIndex(self.page_size * self.coarse, dtype=dtype) if self.coarse > 1 else None
            self.index = PageIndex(self.page_size, clusters=clusters, dtype=dtype)
        self.index.refresh(keys, positions, lengths)
        return self.index

    # ------------------------------------------------------------------ selection

    def pages_per_segment(
        self, lengths: torch.Tensor, num_kv_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored pages, pages to attend) per segment, each (S,) long: ``max(min_pages, budget // page_size)``
        pages (Quest's rule), or every page when the budget covers the stored rows."""
        pages = (lengths + self.page_size - 1) // self.page_size
        budget = self.token_budget.repeat_interleave(num_kv_heads)  # (S,)
        wanted = (budget // self.page_size).clamp(min=self.min_pages)
        wanted = torch.where(budget >= lengths, pages, wanted)  # a budget covering the rows: all of them
        return pages, torch.minimum(wanted, pages)

    def choose_pages(
        self,
        query: torch.Tensor,  # (B, H, 1, D)
        index: PageIndex,
        lengths: torch.Tensor,  # (S,)
        counts: tuple[torch.Tensor, torch.Tensor] | None = None,  # pages_per_segment, when known
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pages each segment attends to: (S, K) page indices and (S, K) validity.

        Each row is the sinks' page, then the best other pages, then the newest page, so the newest page's
        unfilled slots come last. With ``coarse > 1`` only the pages of the chosen clusters are scored
        (:meth:`candidates`); otherwise every page is.
        """
        b = query.shape[0]
        s = lengths.numel()
        num_kv_heads = s // b
        pages, count = counts if counts is not None else self.pages_per_segment(lengths, num_kv_heads)
        q = self._group_queries(query, s)  # (S, g, D)
        newest = pages - 1  # (S,)
        if self.coarse > 1:
            clusters, page_of, exists = self.candidates(q, index.clusters, pages, count)  # (S, M) ascending
            bounds = index.pages_of(clusters)  # (S, M, 2D)
        else:
            page_of = torch.arange(index.pages, device=query.device).expand(s, -1)  # (S, P)
            exists = page_of < pages[:, None]
            bounds = index.bounds  # (S, P, 2D)
        scores = self.page_scores(q, bounds, exists)  # (S, M)
        # the sinks' page goes first and the newest last, outside the ranking; so do pages past the rows
        outside = ~exists | (page_of == 0) | (page_of >= newest[:, None])
        scores = scores.masked_fill(outside, float("-inf"))
        k = max(0, int(count.max()) - 2)
        best = scores.topk(k, dim=-1).indices  # (S, k) best first
        middle = page_of.gather(1, best)
        taken = torch.arange(k, device=query.device)[None, :] < (count - 2)[:, None]  # (S, k)
        taken &= scores.gather(1, best) > float("-inf")  # fewer candidates than wanted: never an outside one
        first = torch.zeros(s, 1, dtype=torch.long, device=query.device)
        chosen_pages = torch.cat([first, middle, newest[:, None]], dim=1)  # (S, k + 2)
        ok = torch.cat([torch.ones_like(first, dtype=torch.bool), taken, (newest > 0)[:, None]], dim=1)
        return chosen_pages, ok

    def page_scores(self, q: torch.Tensor, bounds: torch.Tensor, exists: torch.Tensor | None) -> torch.Tensor:
        """(S, P) fp32 score of every page for the group's queries q (S, g, D); ``bounds`` (S, P, 2D) are the
        pages' maxima then minima (:attr:`PageIndex.bounds`), ``exists`` (S, P) marks the pages that hold
        rows (the others score as they may, never chosen; None: every page holds rows).

        Both scores are one product with the bounds: Quest's bound weighs the maxima by ``q+`` and the
        minima by ``q-``, MPCache's by ``alpha q`` and ``(1 - alpha) q``. Summed over the group, the weights
        are scaled to unit norm (the ranking is the same) and the product runs in the bounds' dtype.
        """
        if self.score == "bound":
            weights = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)  # (S, g, 2D)
        else:
            weights = torch.cat([self.alpha * q, (1 - self.alpha) * q], dim=-1)
        if self.group == "sum":
            vector = F.normalize(weights.sum(1), dim=-1)  # (S, 2D): one unit vector per segment
            return _matvec(bounds, vector.to(bounds.dtype)).float()
        bounds = bounds.float()
        per_head = torch.einsum("spe,sge->sgp", bounds, weights)  # (S, g, P)
        stored = per_head if exists is None else per_head.masked_fill(~exists[:, None], float("-inf"))
        best = stored.amax(dim=-1, keepdim=True)  # (S, g, 1)
        relative = (per_head - best).amax(dim=1)  # (S, P): at most 0 on stored pages
        # every head's best page scores exactly 0; these ties go to the oldest page (a positive rank falling
        # with the slot; pages come in ascending order), so a sequence picks the same pages in a padded batch
        # as alone
        rank = torch.arange(relative.shape[-1], 0, -1, device=q.device, dtype=relative.dtype)
        return torch.where(relative == 0, rank, relative)

    def candidates(
        self,
        q: torch.Tensor,
        clusters: PageIndex,
        pages: torch.Tensor,
        count: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first level of a two-level choice (MPCache's coarse clusters): the best clusters of ``coarse``
        pages (S, K1) in ascending order, their pages (S, M = K1 * coarse) and whether each holds rows (S, M).

        A cluster is scored by the bounds of all its rows, the same score as a page's. The first and the
        segment's last cluster are always chosen, then the best others: ``coarse_ratio`` of the clusters
        (MPCache's rho_1), never fewer than the pages to attend fill. Only the chosen clusters' pages are
        scored after this, so a step reads the bounds of every cluster and of the chosen pages, not of every
        page.
        """
        c = self.coarse
        stored = (pages + c - 1) // c  # (S,) clusters holding rows
        slot = torch.arange(clusters.pages, device=q.device)[None, :]
        exists = slot < stored[:, None]  # (S, C)
        scores = self.page_scores(q, clusters.bounds, exists)  # (S, C)
        forced = (slot == 0) | (slot == (stored - 1)[:, None])
        ranked = scores.masked_fill(forced, float("inf")).masked_fill(~exists, float("-inf"))
        # rho_1 of the clusters, and never fewer than the pages to attend need
        wanted = torch.maximum((self.coarse_ratio * stored.double()).floor().long(), (count + c - 1) // c)
        wanted = torch.minimum(wanted.clamp(min=2), stored)  # (S,)
        k = int(wanted.max())
        top = ranked.topk(k, dim=-1).indices  # (S, K1)
        taken = torch.arange(k, device=q.device)[None, :] < wanted[:, None]
        top = top.masked_fill(~taken, clusters.pages).sort(dim=-1).values  # ascending, the untaken last
        taken = top < clusters.pages
        top = top.masked_fill(~taken, 0)  # an untaken slot reads cluster 0's bounds, never chosen
        page_of = (top[..., None] * c + torch.arange(c, device=q.device)).flatten(1)  # (S, K1 * c)
        exists = taken.repeat_interleave(c, dim=1) & (page_of < pages[:, None])
        return top, page_of, exists

    def gather(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The rows a one-token step attends to, or None when it attends to every stored row.

        Returns keys and values (B, H_kv, W, D) and their validity (B, H_kv, W) bool, or None when every
        gathered row is a stored row: the rows of the chosen pages, page by page (see :meth:`choose_pages`),
        the newest page's unfilled slots left out where every segment ends at the same slot.
        """
        b, h_kv, t, d = obs.keys.shape
        s = b * h_kv
        keys = obs.keys.reshape(s, t, d)
        positions = obs.key_positions.reshape(s, t)
        if obs.all_keys_valid and self.common_budget is not None and self.coarse == 1:
            picked = self._rows_when_segments_agree(obs.query, keys, positions)
        else:
            picked = self._rows_of_chosen_pages(obs.query, keys, positions, obs.key_valid.view(s, t).sum(-1))
        if picked is None:
            return None
        rows, valid = picked  # (S, W) slots of each segment's rows to read, (S, W) bool or None
        flat = (rows + t * torch.arange(s, device=keys.device)[:, None]).view(-1)  # (S * W,) packed rows
        picked_keys = keys.reshape(s * t, d).index_select(0, flat).view(b, h_kv, -1, d)
        picked_values = obs.values.reshape(s * t, d).index_select(0, flat).view(b, h_kv, -1, d)
        return picked_keys, picked_values, None if valid is None else valid.view(b, h_kv, -1)

    def _rows_when_segments_agree(
        self, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, None] | None:
        """:meth:`_rows_of_chosen_pages` when every segment holds the same ``T`` rows and attends to the same
        number of pages (one sequence, or an unpadded batch): the same pages, found with Python counts
        instead of per-segment tensors, which is most of a long context's step on a CPU."""
        s, t, _ = keys.shape
        size, budget = self.page_size, self.common_budget
        pages = -(-t // size)
        # pages_per_segment's rule, on one count
        count = pages if budget >= t else min(max(budget // size, self.min_pages), pages)
        if count >= pages:
            return None
        index = self.index
        if index is None or not index.append_row(keys, positions):
            index = self.refresh(keys, positions, torch.full((s,), t, device=keys.device))
        scores = self.page_scores(self._group_queries(query, s), index.bounds, None)  # (S, P)
        best = scores[:, 1 : pages - 1].topk(count - 2, dim=-1).indices + 1  # (S, count - 2) best first
        first, newest = best.new_zeros(s, 1), best.new_full((s, 1), pages - 1)
        chosen = torch.cat([first, best, newest], dim=1)  # (S, count): the sinks' page, the best, the newest
        rows = (chosen[..., None] * size + torch.arange(size, device=keys.device)).view(s, -1)
        return rows[:, : t - (pages - count) * size], None  # the newest page's unfilled slots trail

    def _rows_of_chosen_pages(
        self, query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Slots (S, W) of the rows each segment reads and their validity (S, W) (None: all valid), or None
        when every segment attends to every row; keys (S, T, D), positions (S, T), lengths (S,)."""
        t = keys.shape[1]
        pages, count = self.pages_per_segment(lengths, lengths.numel() // query.shape[0])
        if bool((count >= pages).all()):
            return None
        index = self.refresh(keys, positions, lengths)
        chosen_pages, chosen = self.choose_pages(query, index, lengths, (pages, count))  # (S, K)
        rows = chosen_pages[..., None] * self.page_size + torch.arange(self.page_size, device=keys.device)
        rows = rows.view(lengths.numel(), -1)  # (S, K * page_size)
        valid = chosen.repeat_interleave(self.page_size, dim=1) & (rows < lengths[:, None])
        width = valid.sum(-1)  # (S,) rows attended per segment
        if bool((width == width[0]).all()) and bool(valid[:, : int(width[0])].all()):
            # every segment reads a prefix of its slots (the newest page's unfilled slots trail): drop the
            # tail and attend without a mask
            return rows[:, : int(width[0])], None
        return rows.clamp(max=t - 1), valid

    @staticmethod
    def _group_queries(query: torch.Tensor, segments: int) -> torch.Tensor:
        """(B, H, 1, D) -> (S, g, D) fp32: the query heads of each segment's GQA group."""
        b, h, _, d = query.shape
        num_kv_heads = segments // b
        return query.float().view(b, num_kv_heads, h // num_kv_heads, d).reshape(segments, -1, d)


def selection_budget_text(ratio: float | None, tokens: int | None) -> str:
    """How a selection budget reads in messages."""
    if tokens is not None:
        return f"{tokens} tokens"
    return f"ratio {ratio:g}" if ratio is not None else "the cache's budget"


def check_selection_budget(name: str, ratio: float | None, tokens: int | None) -> None:
    """One-line ``ValueError`` for a selection budget out of range."""
    if ratio is not None and tokens is not None:
        raise ValueError(f"{name}: give select_ratio or select_tokens, not both")
    if ratio is not None and not (0 < ratio <= 1 and not math.isnan(ratio)):
        raise ValueError(f"{name}: select_ratio must be in (0, 1], got {ratio}")
    if tokens is not None and tokens < 1:
        raise ValueError(f"{name}: select_tokens must be >= 1, got {tokens}")


def _matvec(bounds: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(S, P) = bounds (S, P, D) @ vector (S, D), one matrix-vector product per segment.

    On CPU, ``torch.mv`` per segment is about 7x faster than one batched product (``einsum``/``bmm`` with a
    single column), measured at (2, 4096, 64) fp32 on one thread: 61 against 451 us. With the bounds out of
    the cache, as at a decode step over a long context, fp16 bounds score about 2x faster than fp32:
    253 against 588 us at (2, 4096, 128), one thread.
    """
    return torch.stack([torch.mv(rows, v) for rows, v in zip(bounds, vector, strict=True)])
