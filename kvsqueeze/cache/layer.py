"""One layer of a :class:`~kvsqueeze.cache.cache.SqueezeCache`: ragged kept rows plus the method's step.

The layer keeps two lengths apart:

* the **logical** length ``seen``: tokens this layer has seen (left padding included, as in the 2-D attention
  mask). ``get_seq_length`` reports it, so ``generate`` slices new input and assigns positions correctly;
* the **physical** rows: what is stored per (sequence, KV head), each row with its absolute position.

``update`` appends the new rows and returns padded views; the kvsqueeze attention function then calls
:meth:`SqueezeLayer.attend`, which drops left-padding rows, computes exact attention over the stored rows,
lets the scorer observe the queries, and compresses on the method's schedule.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvsqueeze.actions.evict import protected_rows, select_rows
from kvsqueeze.allocators.base import LayerRequest
from kvsqueeze.attention.binding import bind
from kvsqueeze.attention.masks import attention_mask_for
from kvsqueeze.attention.observation import Observation
from kvsqueeze.attention.sdpa import sdpa
from kvsqueeze.cache.budget import Budget
from kvsqueeze.cache.group import LayerGroup
from kvsqueeze.cache.packed import PackedRows
from kvsqueeze.cache.tiered import TieredRows
from kvsqueeze.methods.base import Components, Schedule
from kvsqueeze.quantization.rope import KeyRotation

KV_FIELDS = ("keys", "values")


class SqueezeLayer(CacheLayerMixin):
    """A cache layer that physically stores only kept rows, per sequence and KV head."""

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        components: Components,
        budget: Budget,
        layer_idx: int,
        num_layers: int,
        sliding_window: int | None = None,
        record_prefill: bool = False,
        key_rotation: KeyRotation | None = None,
    ) -> None:
        # CacheLayerMixin.__init__ would assign self.keys / self.values, which are read-only views here.
        self.is_initialized = False
        self.components = components
        self.budget = budget
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.record_prefill = record_prefill
        self.key_rotation = key_rotation  # the layer's RoPE, for a scheme that quantizes keys before it
        self.group: LayerGroup | None = None  # set by the cache: the sibling layers
        scorer = components.scorer
        # a score per row: the running score of stateful scorers, or the prompt scores cross-layer
        # allocators resize with later
        allocator = components.allocator
        self.keeps_scores = scorer is not None and (
            scorer.stateful or (allocator is not None and allocator.uses_statistics)
        )
        # the attention input (B, q, D_model), set by a hook for learned scorers and recorded prefills
        self.wants_hidden_states = record_prefill or (scorer is not None and scorer.needs_hidden_states)
        self.hidden_states: torch.Tensor | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.rows: PackedRows | TieredRows | None = None  # tiered once a quantizing method has run
        self.seen = 0  # logical tokens seen, left padding included
        self.batch_size = 0
        self.num_kv_heads = 0
        self.head_dim = 0
        self.prompt_lengths: torch.Tensor | None = None  # (B,) real prompt tokens
        self.prompt_end = 0  # `seen` right after the prompt (its padded length)
        self.layer_budget: torch.Tensor | None = None  # (B,) rows this layer may keep now
        self.prefill_budget: torch.Tensor | None = None  # (B,) rows it kept of the prompt
        self.protected_recent: torch.Tensor | None = None  # (B,) rows always kept at the end
        self.compression_seconds = 0.0
        self.recorded: Observation | None = None  # the prompt's queries, when recording (see `adopt_prefill`)
        self.replay_scores: torch.Tensor | None = None  # (B, H_kv, T) best replay attention per prompt row
        self._awaiting_replay: Observation | None = None  # the prompt's call, to quantize after its replay
        self._seen_before_replay = 0
        self.is_initialized = False

    # ------------------------------------------------------------ transformers layer API

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.batch_size, self.num_kv_heads, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.rows = PackedRows(self.batch_size * self.num_kv_heads, device=key_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values (B, H_kv, q, D) and return the stored rows, padded."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, d = key_states.shape
        # transformers hands the decoder layer's kwargs (position_ids, ...) over as `kwargs=`
        model_kwargs = kwargs.get("kwargs", kwargs) or {}
        positions = _positions(model_kwargs.get("position_ids"), b, q, self.seen, key_states.device)  # (B, q)
        new = {
            "keys": key_states.reshape(b * h, q, d),
            "values": value_states.reshape(b * h, q, d),
            "positions": positions[:, None, :].expand(b, h, q).reshape(b * h, q).to(torch.int32),
        }
        if self.keeps_scores:
            new["score"] = torch.zeros(b * h, q, dtype=torch.float32, device=key_states.device)
        self.rows.append(new)
        self.seen += q
        self._note_size()
        keys, values = self.keys, self.values
        bind(keys, self)
        return keys, values

    @property
    def keys(self) -> torch.Tensor | None:
        """Stored keys, (B, H_kv, T_max, D), zero-padded where a segment holds fewer rows."""
        return self._padded("keys")

    @property
    def values(self) -> torch.Tensor | None:
        """Stored values, (B, H_kv, T_max, D)."""
        return self._padded("values")

    def _padded(self, name: str) -> torch.Tensor | None:
        if self.rows is None or not self.rows.has_field(name):
            return None
        padded = self.rows.padded(name)
        return padded.view(self.batch_size, self.num_kv_heads, *padded.shape[1:])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """The logical length: tokens seen, not rows stored."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._reset_state()

    def offload(self) -> None:
        """Offloading is not supported for compressed layers; the rows stay where they are."""

    def prefetch(self) -> None:
        """See :meth:`offload`."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows is None:
            return
        h = self.num_kv_heads
        segments = (indices.to(self.rows.lengths.device)[:, None] * h + torch.arange(h)).reshape(-1)
        self.rows.select_segments(segments)
        for name in ("prompt_lengths", "layer_budget", "prefill_budget", "protected_recent"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[indices])
        if self.components.scorer is not None:
            self.components.scorer.select_batch(indices)
        self.components.action.select_batch(indices)
        if self.components.select is not None:
            self.components.select.select_batch(indices)
        self.batch_size = len(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a compressed cache cannot be cropped (assisted/speculative decoding is not supported)"
        )

    # ------------------------------------------------------------ bytes

    def nbytes(self) -> int:
        """Bytes this layer holds: keys, values, positions, any per-row scorer state and, for a selecting
        method, its page bounds."""
        if self.rows is None:
            return 0
        select = self.components.select
        return self.rows.nbytes() + (0 if select is None else select.nbytes())

    def kv_nbytes(self) -> int:
        """Bytes of the stored keys and values alone."""
        return 0 if self.rows is None else self.rows.nbytes(KV_FIELDS)

    def tokens_seen(self) -> torch.Tensor:
        """Real tokens each sequence has seen (prompt without padding, plus decoded ones), (B,)."""
        return self.prompt_lengths + (self.seen - self.prompt_end)

    def kept_positions(self) -> list[list[list[int]]]:
        """Absolute positions kept, per sequence and KV head: ``[b][h] -> [pos, ...]`` (for tests and tools)."""
        if self.rows is None:
            return []
        pos = self.rows.padded("positions", fill=-1).tolist()  # (S, T_max), temporal order
        lengths = self.rows.lengths.tolist()
        h = self.num_kv_heads
        return [[pos[b * h + i][: lengths[b * h + i]] for i in range(h)] for b in range(self.batch_size)]

    # ------------------------------------------------------------ attention and compression

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, H, q, D)
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact attention of ``query`` over the stored rows, then the method's compression step."""
        b, _, q, _ = query.shape
        query_valid = _query_validity(attention_mask, b, q, query.device)  # (B, q)
        is_prefill = self.prompt_lengths is None
        if not bool(query_valid.all()):
            self._drop_new_rows(~query_valid)
        if is_prefill:
            self.prompt_lengths = query_valid.sum(-1)
            self.prompt_end = self.seen
        window = sliding_window if sliding_window is not None else self.sliding_window
        obs = self._observe(query, query_valid, position_ids, scaling, window, is_prefill)
        self.hidden_states = None  # observed; the hook sets it again for the next call
        output = self._attention_output(module, obs, dropout)
        span = self.group.replay_span if self.group is not None else None
        if span is not None:  # a replay round scores the prompt's rows; nothing is compressed
            o_proj = getattr(module, "o_proj", None)  # KVzip+ weighs rows by what they write through it
            weight = o_proj.weight if isinstance(o_proj, torch.nn.Linear) else None
            scores = self.components.scorer.replay_scores(obs, span, weight)  # (B, H_kv, T)
            width = self.replay_scores.shape[-1]
            self.replay_scores = torch.maximum(self.replay_scores, scores[..., :width])
            self.rows.release()
            return output
        if is_prefill and self.record_prefill:
            self.recorded = obs
        if window is not None and self._trim_sliding_window(obs, window):
            obs = self._observe(query, query_valid, position_ids, scaling, window, is_prefill)
        self._compress_and_quantize(obs)
        self.rows.release()  # the dequantized keys and values of a quantized layer live for one call
        self._note_size()
        return output

    def adopt_prefill(self, source: SqueezeLayer, reuse_attention: bool = False) -> None:
        """Become what this layer would have been after ``source``'s prompt, with this layer's method.

        ``source`` must be an uncompressed layer that recorded its prompt (``record_prefill=True``). Its
        rows are copied and this layer's method compresses them, scored with the recorded queries, exactly
        as if it had run during that prefill: prefill attention is exact, so a prompt's keys, values and
        queries do not depend on the method. This is how one prefill serves many methods and budgets.
        ``reuse_attention``: what scorers compute over the prompt (its column sums, ZipCache's saliency) is
        kept on the recording, so every later adopter reuses it instead of walking the prompt's attention
        again (same scores, same rows kept; the compression time is then not the method's own).
        """
        if source.recorded is None:
            raise ValueError(
                "adopt_prefill needs a source layer that recorded its prefill (record_prefill=True)"
            )
        rec = source.recorded
        self.lazy_initialization(rec.keys, rec.values)
        self.rows = source.rows.clone()
        if self.keeps_scores:
            self.rows.fields.setdefault("score", torch.zeros(self.rows.num_rows, device=self.device))
        self.seen, self.prompt_end = source.seen, source.prompt_end
        self.prompt_lengths = source.prompt_lengths.clone()
        obs = dataclasses.replace(rec, **self._stored_rows())
        if reuse_attention:  # one memo: what one adopter computes over the prompt serves the next
            obs.share_memo(rec)
        self._compress_and_quantize(obs)
        self.rows.release()
        self._note_size()

    def _observe(
        self,
        query: torch.Tensor,
        query_valid: torch.Tensor,
        position_ids: torch.Tensor | None,
        scaling: float,
        window: int | None,
        is_prefill: bool,
    ) -> Observation:
        b, _, q, _ = query.shape
        return Observation(
            query=query,
            query_positions=_positions(position_ids, b, q, self.seen - q, query.device),
            query_valid=query_valid,
            scaling=scaling,
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
            sliding_window=window,
            is_prefill=is_prefill,
            hidden_states=self.hidden_states,
            **self._stored_rows(),
        )

    def _rows_observation(self) -> Observation:
        """The stored rows as an observation without queries, for a plan made after the prompt's attention."""
        b, device = self.batch_size, self.device
        return Observation(
            query=torch.empty(b, self.num_kv_heads, 0, self.head_dim, dtype=self.dtype, device=device),
            query_positions=torch.empty(b, 0, dtype=torch.long, device=device),
            query_valid=torch.empty(b, 0, dtype=torch.bool, device=device),
            scaling=1.0,
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
            sliding_window=self.sliding_window,
            **self._stored_rows(),
        )

    def _stored_rows(self) -> dict[str, Any]:
        """The stored rows as an :class:`Observation` sees them: padded keys, values, positions, validity."""
        b, h, t = self.batch_size, self.num_kv_heads, self.rows.max_length
        return {
            "keys": self.keys,  # (B, H_kv, T, D)
            "values": self.values,
            "key_positions": self.rows.padded("positions", fill=-1).view(b, h, t),
            "key_valid": self.rows.valid_mask().view(b, h, t),
            "all_keys_valid": self.rows.is_uniform,
        }

    def _attention_output(self, module: torch.nn.Module, obs: Observation, dropout: float) -> torch.Tensor:
        if self._selects(obs):
            picked = self.components.select.gather(obs)
            if picked is not None:  # attend to the chosen pages' rows only
                keys, values, valid = picked  # (B, H_kv, K, D), (B, H_kv, K, D), (B, H_kv, K) or None
                # one query per sequence, the newest: every stored row of a full-attention layer is visible
                mask = None
                if valid is not None and not bool(valid.all()):
                    mask = valid[:, :, None, :].repeat_interleave(obs.group_size, dim=1)  # (B, H, 1, K)
                return sdpa(module, obs.query, keys, values, mask, dropout=dropout, scaling=obs.scaling)
        mask = attention_mask_for(obs)
        return sdpa(module, obs.query, obs.keys, obs.values, mask, dropout=dropout, scaling=obs.scaling)

    def _selects(self, obs: Observation) -> bool:
        """Whether this call attends to selected pages: a one-token step after the prompt, on a layer that
        selects (multi-token calls, the first dense layers and sliding-window layers attend densely)."""
        select = self.components.select
        return (
            select is not None
            and not obs.is_prefill
            and obs.query_length == 1
            and obs.sliding_window is None
            and select.active(self.layer_idx)
        )

    def _refresh_selection(self) -> None:
        """Build or update a selecting layer's page bounds over the rows it now stores."""
        select = self.components.select
        if select is None or self.rows is None or self.sliding_window is not None:
            return
        if not select.active(self.layer_idx):
            return
        select.refresh(self.rows.padded("keys"), self.rows.padded("positions", fill=-1), self.rows.lengths)

    def _drop_new_rows(self, padding: torch.Tensor) -> None:
        """Remove the rows of left-padding tokens just appended; ``padding`` is (B, q) bool."""
        b, q = padding.shape
        h = self.num_kv_heads
        t = self.rows.max_length
        lengths = self.rows.lengths.view(b, h)
        slot = torch.arange(t, device=padding.device)
        is_new = slot[None, None, :] >= (lengths - q)[..., None]  # (B, H, T)
        new_col = (slot[None, None, :] - (lengths - q)[..., None]).clamp(0, q - 1)
        drop = is_new & torch.gather(padding[:, None, :].expand(b, h, q), 2, new_col)
        self.rows.keep((self.rows.valid_mask().view(b, h, t) & ~drop).view(b * h, t))

    def _compress_and_quantize(self, obs: Observation) -> None:
        """The method's step after an attention call: evict on its schedule, then quantize what is due.

        A prompt scored by a replay (KVzip) waits: the cache replays it once every layer has it, then
        :meth:`compress_scored` evicts and quantizes what stays (so the replay reads full-precision rows).
        """
        scorer, select = self.components.scorer, self.components.select
        if obs.is_prefill and select is not None:
            select.set_budget(self.prompt_lengths, self.budget.resolve(self.prompt_lengths))
        if obs.is_prefill and scorer is not None and scorer.replays:
            self._awaiting_replay = obs if self.components.quantize is not None else None
            return
        self._compress(obs)
        self._quantize(obs)
        if obs.is_prefill:
            self._refresh_selection()  # the page bounds exist (and are counted) from the prompt on

    def _compress(self, obs: Observation) -> None:
        comp = self.components
        if comp.schedule is Schedule.NEVER:
            return
        if not obs.is_prefill and comp.schedule is not Schedule.EVERY_STEP:
            return
        start = time.perf_counter()
        if comp.select is not None:
            comp.select.invalidate()  # rows may be evicted or merged: the page bounds are rebuilt
        if obs.is_prefill and comp.allocator.uses_statistics:
            self._plan_across_layers(obs)
        else:
            if obs.is_prefill:
                self._set_budget(comp.allocator.layer_budget(self._request()))
            else:
                stored = self.rows.lengths.view(obs.batch_size, -1).amax(-1)  # (B,)
                self.layer_budget = comp.allocator.decode_budget(
                    self.prefill_budget, self.prompt_lengths, self.tokens_seen(), stored
                )
            self._score_and_select(obs)
        self.compression_seconds += time.perf_counter() - start

    def _note_size(self) -> None:
        if self.group is not None:
            self.group.note_size(self)

    def _quantize(self, obs: Observation) -> None:
        """Quantize the rows that are due (all after the prompt, a block at a time during decode)."""
        quant = self.components.quantize
        if quant is None:
            return
        start = time.perf_counter()
        if not isinstance(self.rows, TieredRows):
            scheme = quant.scheme_for(self.layer_idx)
            self.rows = TieredRows(self.rows, scheme, self.dtype, self.key_rotation)
        due = quant.due(self.rows.residual, obs.is_prefill)  # (S, T_res)
        if due is None:
            return
        if self.components.select is not None:
            self.components.select.invalidate()  # keys become their dequantized values
        saliency = None
        if quant.saliency is not None:
            current = dataclasses.replace(obs, **self._stored_rows())  # the rows eviction left
            current.share_memo(obs)  # nothing evicted: the prompt's saliency is the observation's
            scores = quant.rank(current)  # (B, H_kv, T)
            saliency = self.rows.residual_part(scores.reshape(-1, scores.shape[-1]))
        self.rows.quantize(due, saliency)
        self.compression_seconds += time.perf_counter() - start

    def _score_and_select(self, obs: Observation) -> None:
        """Score the stored rows (keeping a running score up to date) and evict down to the budget."""
        comp = self.components
        lengths = self.rows.lengths.view(obs.batch_size, -1)
        select = bool((lengths > self.layer_budget[:, None]).any()) or (
            obs.is_prefill and comp.heads.sizes_itself
        )
        if not (select or comp.scorer.stateful):
            return  # nothing to evict, and no running score to keep up to date
        state = self.rows.padded("score").view(obs.key_positions.shape) if comp.scorer.stateful else None
        scores = comp.scorer.score(obs, state)  # (B, H_kv, T) fp32
        if comp.scorer.stateful:
            self.rows.update_field("score", scores.reshape(-1, scores.shape[-1]))
        if select:
            self._select(scores, obs.key_positions, obs.key_valid, obs)

    def _select(
        self,
        scores: torch.Tensor,  # (B, H_kv, T) fp32
        key_positions: torch.Tensor,  # (B, H_kv, T)
        key_valid: torch.Tensor,  # (B, H_kv, T) bool
        obs: Observation | None,
    ) -> None:
        """Split the layer budget over heads, choose the rows, and let the action free the others."""
        comp = self.components
        protected = protected_rows(key_positions, key_valid, self.protected_recent, comp.sinks)
        if self.layer_budget.dim() == 2:  # the allocator planned every head (a global top-k)
            counts = self.layer_budget
        else:
            counts = comp.heads.head_counts(scores, key_valid & ~protected, protected, self.layer_budget)
        keep = select_rows(scores, key_valid, protected, counts)  # (B * H_kv, T)
        comp.action.apply(self.rows, obs, scores, keep)

    def _plan_across_layers(self, obs: Observation, scores: torch.Tensor | None = None) -> None:
        """Cross-layer allocators: score this layer's prompt, record its statistic, resize the layers.

        The scores are stored beside the rows so that a later layer's plan can shrink this one again
        (CAKE's cascade) without its queries. ``scores`` given: computed already (by a replay).
        """
        comp = self.components
        if scores is None:
            scores = comp.scorer.score(obs, None)  # (B, H_kv, T) fp32
        self.rows.update_field("score", scores.reshape(-1, scores.shape[-1]))
        statistics = self.group.record(self.layer_idx, comp.allocator.layer_statistic(obs, scores))
        self._set_budget(self.rows.lengths.view(obs.batch_size, -1).amax(-1))  # until planned
        for idx, budget in comp.allocator.plan(statistics, self._request()).items():
            self.group.layers[idx].resize(budget)

    def resize(self, budget: torch.Tensor) -> None:
        """Keep at most ``budget`` rows per head, (B,) or per (sequence, head) (B, H_kv), chosen by the
        scores stored at prefill."""
        self._set_budget(budget)
        b, h, t = self.batch_size, self.num_kv_heads, self.rows.max_length
        per_head = budget if budget.dim() == 2 else budget[:, None]
        if not bool((self.rows.lengths.view(b, h) > per_head).any()):
            return
        stored = self._stored_rows()
        scores = self.rows.padded("score").view(b, h, t)
        self._select(scores, stored["key_positions"], stored["key_valid"], None)
        self._note_size()

    def _set_budget(self, budget: torch.Tensor) -> None:
        """This layer's rows per head (B,) or per (sequence, head) (B, H_kv) after the prompt, and the
        recent rows it protects."""
        self.layer_budget = self.prefill_budget = budget
        largest = budget if budget.dim() == 1 else budget.amax(-1)
        self.protected_recent = torch.tensor(
            [self.components.protected_recent(int(n)) for n in largest.tolist()], device=budget.device
        )

    # ------------------------------------------------------------ scoring by replay (KVzip)

    def begin_replay(self) -> None:
        """Start a replay of the prompt: no row has been paid attention yet."""
        b, h, t = self.batch_size, self.num_kv_heads, self.rows.max_length
        self.replay_scores = torch.zeros(b, h, t, dtype=torch.float32, device=self.device)
        self._seen_before_replay = self.seen

    def end_replay_round(self, prompt_end: torch.Tensor) -> None:
        """Drop the rows a replay round appended (positions from ``prompt_end`` (B,) on)."""
        b, h, t = self.batch_size, self.num_kv_heads, self.rows.max_length
        positions = self.rows.padded("positions", fill=-1).view(b, h, t)
        keep = self.rows.valid_mask().view(b, h, t) & (positions < prompt_end[:, None, None])
        self.rows.keep(keep.view(b * h, t))
        self.seen = self._seen_before_replay

    def finish_replay(self, header_end: torch.Tensor) -> torch.Tensor:
        """The replay's scores of the stored rows (B, H_kv, T), rows before ``header_end`` (B,) at +inf."""
        b, h, t = self.batch_size, self.num_kv_heads, self.rows.max_length
        positions = self.rows.padded("positions", fill=-1).view(b, h, t)
        scores = self.replay_scores.masked_fill(positions < header_end[:, None, None], float("inf"))
        self.replay_scores = None
        return scores

    def compress_scored(self, scores: torch.Tensor) -> None:
        """Compress the prompt by ``scores`` (B, H_kv, T) computed after its attention, as the prefill's
        own compression step would have (a cross-layer plan, or this layer's budget)."""
        start = time.perf_counter()
        comp = self.components
        obs = self._rows_observation()
        if comp.allocator.uses_statistics:
            self._plan_across_layers(obs, scores)
        else:
            self._set_budget(comp.allocator.layer_budget(self._request()))
            self._select(scores, obs.key_positions, obs.key_valid, None)
        self.compression_seconds += time.perf_counter() - start
        prompt, self._awaiting_replay = self._awaiting_replay, None
        if prompt is not None:
            self._quantize(prompt)
        self._refresh_selection()
        self.rows.release()
        self._note_size()

    def _request(self) -> LayerRequest:
        """What the allocator knows about this layer; a one-line error for a budget below the method's floor."""
        comp = self.components
        average = self.budget.resolve(self.prompt_lengths)
        too_small = average < comp.min_budget()
        if bool(too_small.any()):
            raise ValueError(
                f"budget of {int(average[too_small][0])} tokens is too small for this method: it always keeps "
                f"{comp.sinks} sink(s) and a window of {comp.window}; use a budget of at least {comp.min_budget()}"
            )
        return LayerRequest(self.layer_idx, self.num_layers, average, self.prompt_lengths, comp.window)

    def _trim_sliding_window(self, obs: Observation, window: int) -> bool:
        """Free rows that no future query of a sliding-window layer can see; True if any was freed."""
        newest = obs.query_positions.max(dim=-1).values  # (B,)
        keep = obs.key_valid & (obs.key_positions > (newest + 1 - window)[:, None, None])  # (B, H_kv, T)
        if bool(keep.sum() == self.rows.num_rows):
            return False
        self.rows.keep(keep.view(-1, keep.shape[-1]))
        return True


def _query_validity(
    attention_mask: torch.Tensor | None, b: int, q: int, device: torch.device
) -> torch.Tensor:
    """(B, q) bool: which of this call's tokens are real, from the 2-D padding mask when there is one."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.ones(b, q, dtype=torch.bool, device=device)
    return attention_mask[:, -q:].to(torch.bool)


def _positions(
    position_ids: torch.Tensor | None, b: int, q: int, start: int, device: torch.device
) -> torch.Tensor:
    """(B, q) absolute positions of this call's tokens: the model's ``position_ids`` when it passes them,
    else ``start + arange(q)``."""
    if position_ids is None:
        return (torch.arange(q, device=device) + start).expand(b, q)
    position_ids = position_ids.to(device)
    if position_ids.dim() == 3:  # multimodal rope sections: the text axis is the first
        position_ids = position_ids[0]
    return position_ids[..., -q:].expand(b, q)
