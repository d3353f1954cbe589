"""Tiered rows: a layer's rows stored partly quantized (one tier per bit width) and partly in full precision.

A quantized layer keeps its recent rows in a full-precision *residual* (KIVI's residual window, ZipCache's
streaming buffer) and moves older rows into :class:`QuantizedTier` s: packed low-bit codes per row plus
the per-group key parameters of :mod:`kvsqueeze.quantization.rows`. Every tier, and the residual, is a
:class:`~kvsqueeze.cache.packed.PackedRows` over the same segments (one per (sequence, KV head)), so rows
of one head can sit at different precisions and still be evicted one by one.

:class:`TieredRows` shows the tiers and the residual as one set of rows per segment, **in temporal order**
(sorted by position), with the :class:`PackedRows` methods the layer uses (``padded``, ``keep``,
``update_field``, ``select_segments``, ``append``, ``nbytes``). So eviction, the recent window and the
attention masks work on a quantized layer unchanged. ``padded("keys")`` dequantizes the layer's rows for one
attention call (rows quantized in a rotated frame are turned back to the model's); the copy is dropped by
:meth:`TieredRows.release` when the call ends, so at most one layer's full-precision keys and values exist
at a time and nothing full precision stays between calls.

Plain PyTorch: no transformers import.
"""

from __future__ import annotations

import copy

import torch

from kvsqueeze.cache.packed import PackedRows, pad_rows, rows_of_segments
from kvsqueeze.quantization.budget import KVQuantScheme
from kvsqueeze.quantization.hadamard import rotate_values
from kvsqueeze.quantization.packing import unpack_codes_float
from kvsqueeze.quantization.quantizer import EPS, round_up
from kvsqueeze.quantization.rope import KeyRotation
from kvsqueeze.quantization.rows import (
    broadcast_params,
    decode_tokens,
    encode,
    group_channel_params,
    group_channel_peak,
    scale_by_group,
    token_params,
)

KV_FIELDS = ("keys", "values")


class QuantizedTier:
    """The rows of every segment whose keys are stored at one bit width and values at one bit width.

    Per row (in ``rows``): packed key and value codes ``(N, D * bits / 8)`` uint8, per-token value
    parameters ``(N, D / G_v)``, and the layer's other per-row fields (positions, running scores). Per row
    group (``key_group_size`` consecutive rows of one segment quantized together, or all of them): the
    per-channel key step and minimum ``(S, n_groups, D)``. Per quantization event, for CST values: the
    channel scale ``c`` ``(S, n_events, D)``. ``group_lengths`` ``(S, n_groups)`` and ``event_lengths``
    ``(S, n_events)`` count the rows of each; a segment's rows are stored event after event and group after
    group, so a row's group and event follow from the counts and cost no bytes.
    """

    def __init__(
        self,
        scheme: KVQuantScheme,
        key_bits: int,
        value_bits: int,
        num_segments: int,
        head_dim: int,
        device: torch.device,
        key_group_size: int | None = None,
    ) -> None:
        self.scheme, self.key_group_size = scheme, key_group_size
        self.key_bits, self.value_bits = key_bits, value_bits
        self.rows = PackedRows(num_segments, device=device)
        empty = torch.empty(num_segments, 0, head_dim, dtype=scheme.param_dtype, device=device)
        self.key_steps, self.key_mins = empty, empty.clone()
        self.value_scale = empty.clone() if scheme.value_cst else None
        self.group_lengths = torch.zeros(num_segments, 0, dtype=torch.long, device=device)
        self.event_lengths = self.group_lengths.clone()  # (S, n_events): rows each add() stored

    @property
    def num_segments(self) -> int:
        return self.rows.num_segments

    def add(
        self,
        keys: torch.Tensor,  # (M, D)
        values: torch.Tensor,  # (M, D)
        segments: torch.Tensor,  # (M,) sorted, each segment's rows in temporal order
        channel_scale: torch.Tensor | None,  # (S, D) CST divisor of this event, shared with the other tiers
        extra: dict[str, torch.Tensor],  # other per-row fields, (M, *feature)
    ) -> None:
        """Quantize rows and append them as one event: per segment, row groups of ``key_group_size``
        consecutive rows (one group when ``None``), the last one possibly partial."""
        s, d = self.num_segments, keys.shape[-1]
        counts = torch.bincount(segments, minlength=s)  # (S,)
        if self.key_group_size is None:
            groups, num_groups = torch.zeros_like(segments), 1
        else:
            groups = rows_of_segments(counts)[1] // self.key_group_size  # rank in the segment, grouped
            num_groups = max(1, -(-int(counts.max()) // self.key_group_size))
        flat = segments * num_groups + groups  # (M,) into this event's (S * num_groups) groups
        steps, mins = group_channel_params(
            keys,
            flat,
            s * num_groups,
            self.key_bits,
            clip=self.scheme.key_clip,
            param_dtype=self.scheme.param_dtype,
        )  # (S * n, D)
        key_codes = encode(keys, steps[flat], mins[flat], self.key_bits)
        if channel_scale is not None:
            values = values.float() / channel_scale[segments].float()
        v_steps, v_mins = token_params(
            values, self.value_bits, self.scheme.value_group_size, param_dtype=self.scheme.param_dtype
        )
        value_codes = encode(values, v_steps, v_mins, self.value_bits)
        self.key_steps = torch.cat([self.key_steps, steps.view(s, num_groups, d)], dim=1)
        self.key_mins = torch.cat([self.key_mins, mins.view(s, num_groups, d)], dim=1)
        if self.value_scale is not None:
            self.value_scale = torch.cat([self.value_scale, channel_scale[:, None]], dim=1)
        group_counts = torch.bincount(flat, minlength=s * num_groups).view(s, num_groups)
        self.group_lengths = torch.cat([self.group_lengths, group_counts], dim=1)
        self.event_lengths = torch.cat([self.event_lengths, counts[:, None]], dim=1)
        fields = {
            "key_codes": key_codes,
            "value_codes": value_codes,
            "value_steps": v_steps,
            "value_mins": v_mins,
        }
        self.rows.append_rows(segments, {**fields, **extra})

    @staticmethod
    def _row_index(lengths: torch.Tensor) -> torch.Tensor:
        """(N,) flat index into an ``(S, n)`` table of every stored row, given the table's row counts."""
        counts = lengths.reshape(-1)
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def dequantize(self, name: str) -> torch.Tensor:
        """Keys or values of every stored row, ``(N, D)`` fp32, in storage order, in the frame they were
        quantized in (keys before RoPE under ``key_pre_rope``, values turned under ``value_hadamard``)."""
        fields, d = self.rows.fields, self.key_steps.shape[-1]
        if not fields:
            return torch.empty(0, d, device=self.key_steps.device)
        counts = self.group_lengths.reshape(-1)
        if name == "keys":
            keys = unpack_codes_float(fields["key_codes"], self.key_bits)  # (N, D)
            return scale_by_group(keys, self.key_steps.reshape(-1, d), self.key_mins.reshape(-1, d), counts)
        values = decode_tokens(
            fields["value_codes"], fields["value_steps"], fields["value_mins"], self.value_bits
        )
        if self.value_scale is not None:
            scale_by_group(values, self.value_scale.reshape(-1, d), None, self.event_lengths.reshape(-1))
        return values

    def element_steps(self, name: str) -> torch.Tensor:
        """The quantization step of every element of the stored keys or values, ``(N, D)`` fp32.

        Each reconstructed element is within half its step of the original (up to fp32 rounding).
        """
        fields, d = self.rows.fields, self.key_steps.shape[-1]
        if name == "keys":
            return self.key_steps.reshape(-1, d)[self._row_index(self.group_lengths)].float()
        steps = broadcast_params(fields["value_steps"], d)
        if self.value_scale is not None:
            steps = steps * self.value_scale.reshape(-1, d)[self._row_index(self.event_lengths)].float()
        return steps

    def keep_rows(self, mask: torch.Tensor) -> None:
        """Keep the rows where ``mask`` ``(N,)`` is True; the group tables stay (their rows may come back
        no more, but a group's parameters are a few bytes per segment)."""
        for name in ("group_lengths", "event_lengths"):
            lengths = getattr(self, name)
            kept = torch.bincount(self._row_index(lengths)[mask], minlength=lengths.numel())
            setattr(self, name, kept.view(lengths.shape))
        self.rows.keep_rows(mask)

    def select_segments(self, segments: torch.Tensor) -> None:
        self.rows.select_segments(segments)
        self.key_steps, self.key_mins = self.key_steps[segments], self.key_mins[segments]
        if self.value_scale is not None:
            self.value_scale = self.value_scale[segments]
        self.group_lengths = self.group_lengths[segments]
        self.event_lengths = self.event_lengths[segments]

    def nbytes(self, names: tuple[str, ...] | None = None) -> int:
        """Bytes of codes and parameters (``keys``, ``values``) and of the other per-row fields."""
        tables = {
            "keys": (self.key_steps, self.key_mins),
            "values": () if self.value_scale is None else (self.value_scale,),
        }
        stored = {"keys": ("key_codes",), "values": ("value_codes", "value_steps", "value_mins")}
        if names is None:
            codes = {field for fields in stored.values() for field in fields}
            names = KV_FIELDS + tuple(n for n in self.rows.fields if n not in codes)
        total = 0
        for name in names:
            total += self.rows.nbytes(stored.get(name, (name,)))
            total += sum(t.numel() * t.element_size() for t in tables.get(name, ()))
        return total


class TieredRows:
    """A layer's rows: quantized tiers plus a full-precision residual, seen as one temporal set per segment.

    Args:
        residual: the layer's full-precision rows (fields ``keys``, ``values``, ``positions`` and any
            per-row state); it becomes the residual, and :meth:`quantize` moves rows out of it.
        scheme: how rows are quantized: one tier at ``scheme.high_key_bits`` for keys and
            ``scheme.high_value_bits`` for values (both ``scheme.bits`` unless set); when it splits tokens
            (ZipCache), a tier for each (key bits, value bits) pair its key and value ratios can produce:
            ``low_bits`` for both, and with different ratios ``low_bits`` for only the keys or only the
            values. Each tier has its own key parameters, so with different ratios the high-bit keys are
            stored as two sets (ZipCache's code keeps them as one; this costs one more pair per block).
        dtype: the dtype of the dequantized keys and values attention gets.
        key_rotation: the layer's RoPE, required by a ``key_pre_rope`` scheme: the tiers then hold keys
            turned back to before RoPE (``QuantizedTier.dequantize`` returns them so), and
            :meth:`padded` turns them forward again at each row's position.
    """

    def __init__(
        self,
        residual: PackedRows,
        scheme: KVQuantScheme,
        dtype: torch.dtype,
        key_rotation: KeyRotation | None = None,
    ) -> None:
        keys = residual.fields["keys"]
        if scheme.key_pre_rope and key_rotation is None:
            raise ValueError(
                f"scheme {scheme.name!r} quantizes keys before RoPE; pass the layer's key_rotation"
            )
        self.scheme, self.dtype = scheme, dtype
        self.key_rotation = key_rotation if scheme.key_pre_rope else None
        self.residual = residual
        self.kinds = tier_kinds(scheme)  # per tier: (keys at low bits, values at low bits)
        self.tiers = [
            QuantizedTier(
                scheme,
                scheme.low_bits if key_low else scheme.high_key_bits,
                scheme.low_bits if value_low else scheme.high_value_bits,
                residual.num_segments,
                keys.shape[-1],
                keys.device,
                scheme.low_set_key_group if key_low else scheme.key_group_size,
            )
            for key_low, value_low in self.kinds
        ]
        self._invalidate()

    # ------------------------------------------------------------------ the combined view

    def _invalidate(self, tiers: bool = True) -> None:
        """Forget derived state: the dequantized view always, the tiers' slots when the tiers changed."""
        if tiers:
            self._tier_slots: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._dense: dict[str, torch.Tensor] = {}

    def release(self) -> None:
        """Drop the dequantized keys and values of the current attention call."""
        self._dense = {}

    @property
    def num_segments(self) -> int:
        return self.residual.num_segments

    @property
    def lengths(self) -> torch.Tensor:
        """(S,) rows per segment, all tiers and the residual together."""
        return self.residual.lengths + self._tier_lengths()

    def _tier_lengths(self) -> torch.Tensor:
        return sum((tier.rows.lengths for tier in self.tiers), torch.zeros_like(self.residual.lengths))

    @property
    def num_rows(self) -> int:
        return int(self.lengths.sum())

    @property
    def is_uniform(self) -> bool:
        lengths = self.lengths
        return bool((lengths == lengths[0]).all()) if lengths.numel() else True

    @property
    def max_length(self) -> int:
        lengths = self.lengths
        return int(lengths.max()) if lengths.numel() else 0

    def has_field(self, name: str) -> bool:
        return self.residual.has_field(name)

    def valid_mask(self) -> torch.Tensor:
        """(S, T_max) bool: True where a padded slot holds a stored row."""
        t = torch.arange(self.max_length, device=self.residual.lengths.device)
        return t[None, :] < self.lengths[:, None]

    def slots(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Where every stored row sits in the combined view: per part (tiers, then the residual), its rows'
        segment and slot ``(N_p,)`` each. A segment's slots are its rows in temporal order: the quantized
        rows sorted by position, then the residual, which only ever holds the newest rows."""
        if self._tier_slots is None:
            segments = [tier.rows.segment_of_row()[0] for tier in self.tiers]
            positions = [
                tier.rows.fields["positions"].long() if tier.rows.fields else seg
                for tier, seg in zip(self.tiers, segments, strict=True)
            ]
            seg, pos = torch.cat(segments), torch.cat(positions)
            span = int(pos.max()) + 2 if pos.numel() else 1
            order = torch.argsort(seg * span + pos, stable=True)
            counts = torch.bincount(seg, minlength=self.num_segments)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel(), device=order.device)
            within = rank - (torch.cumsum(counts, 0) - counts)[seg]
            sizes = [s.numel() for s in segments]
            self._tier_slots = list(zip(seg.split(sizes), within.split(sizes), strict=True))
        seg, within = self.residual.segment_of_row()
        return [*self._tier_slots, (seg, within + self._tier_lengths()[seg])]

    def _parts(self) -> list[PackedRows]:
        return [tier.rows for tier in self.tiers] + [self.residual]

    def padded(self, name: str, fill: float = 0) -> torch.Tensor:
        """Field ``name`` as (S, T_max, *feature), rows in temporal order; keys and values dequantized."""
        if name in self._dense:
            return self._dense[name]
        own = self.residual.fields[name]
        kv = name in KV_FIELDS
        dtype = self.dtype if kv else own.dtype
        out = own.new_full((self.num_segments, self.max_length, *own.shape[1:]), fill, dtype=dtype)
        slots = self.slots()
        for (seg, within), tier in zip(slots, self.tiers, strict=False):
            if tier.rows.fields:
                out[seg, within] = self._dequantize(tier, name).to(dtype) if kv else tier.rows.fields[name]
        seg, within = slots[-1]
        out[seg, within] = own.to(dtype)
        if kv:
            self._dense[name] = out
        return out

    def _dequantize(self, tier: QuantizedTier, name: str) -> torch.Tensor:
        """A tier's keys or values ``(N, D)`` fp32 as attention sees them (in the model's frame)."""
        rows = tier.dequantize(name)
        if name == "keys" and self.key_rotation is not None:
            rows = self.key_rotation.rotate(rows, tier.rows.fields["positions"])
        if name == "values" and self.scheme.value_hadamard:
            rows = rotate_values(rows)  # H is its own inverse
        return rows

    def _gather(self, padded: torch.Tensor) -> list[torch.Tensor]:
        """A per-row tensor given as (S, T_max, *feature) in combined order, split per part's stored rows."""
        return [padded[seg, within] for seg, within in self.slots()]

    def residual_part(self, padded: torch.Tensor) -> torch.Tensor:
        """The residual's share of a (S, T_max) per-row tensor, as the residual's own (S, T_res) padding."""
        return pad_rows(self._gather(padded)[-1], self.residual.lengths, None)

    # ------------------------------------------------------------------ changing rows

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the rows where ``mask`` (S, T_max), in combined order, is True; free the others."""
        parts = self._gather(mask)
        for tier, keep in zip(self.tiers, parts, strict=False):
            tier.keep_rows(keep)
        self.residual.keep_rows(parts[-1])
        self._invalidate(tiers=any(bool(~keep.all()) for keep in parts[:-1]))

    def update_field(self, name: str, padded: torch.Tensor) -> None:
        """Write a per-row field (a running score) given as (S, T_max, *feature) in combined order."""
        if name in KV_FIELDS:
            raise ValueError(
                "quantized keys and values cannot be rewritten in place (merging needs full precision)"
            )
        parts = self._gather(padded)
        for part, data in zip(self._parts(), parts, strict=True):
            if part.fields:  # a tier that never received rows gets the field with its first rows
                part.fields[name] = data.to(part.fields[name].dtype) if name in part.fields else data
        self._dense.pop(name, None)

    def select_segments(self, segments: torch.Tensor) -> None:
        for tier in self.tiers:
            tier.select_segments(segments)
        self.residual.select_segments(segments)
        self._invalidate()

    def append(self, new: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> None:
        """New rows go to the full-precision residual."""
        self.residual.append(new, keep)
        self._invalidate(tiers=False)

    def nbytes(self, names: tuple[str, ...] | None = None) -> int:
        """Bytes held: codes and parameters of the tiers plus the residual's rows."""
        return sum(tier.nbytes(names) for tier in self.tiers) + self.residual.nbytes(names)

    def clone(self) -> TieredRows:
        self.release()
        return copy.deepcopy(self)

    # ------------------------------------------------------------------ quantizing

    def quantize(self, select: torch.Tensor, saliency: torch.Tensor | None = None) -> None:
        """Move the residual rows marked by ``select`` (S, T_res) into the quantized tiers.

        ``saliency`` (S, T_res) ranks them for a split scheme: in each segment the keys of the
        ``floor(key_ratio * n)`` least salient of its ``n`` selected rows and the values of the
        ``floor(value_ratio * n)`` least salient are stored at low bits.
        """
        scheme, res = self.scheme, self.residual
        seg, within = res.segment_of_row()
        chosen = select[seg, within]  # (N_res,)
        if not bool(chosen.any()):
            return
        moving = {name: data[chosen] for name, data in res.fields.items()}
        if self.key_rotation is not None:  # quantized before RoPE: undo it at each row's position
            moving["keys"] = self.key_rotation.rotate(moving["keys"], moving["positions"], inverse=True)
        if scheme.value_hadamard:
            moving["values"] = rotate_values(moving["values"])
        segments = seg[chosen]  # (M,) sorted
        channel_scale = None
        if scheme.value_cst:  # one c per segment for this block, shared by the tiers
            peak = group_channel_peak(moving["values"], segments, self.num_segments)
            channel_scale = round_up(peak.sqrt().clamp_min(EPS), scheme.param_dtype)  # (S, D)
        key_low = value_low = torch.zeros_like(segments, dtype=torch.bool)  # (M,)
        if scheme.splits:
            if saliency is None:
                raise ValueError(f"scheme {scheme.name!r} splits rows by saliency; pass saliency")
            rank = _saliency_rank(saliency, select)[select]  # (M,) 0 = least salient of its segment
            selected = select.sum(-1)[segments]  # (M,) rows selected in the row's segment
            key_low = rank < (scheme.key_ratio * selected).floor().long()
            value_low = rank < (scheme.value_ratio * selected).floor().long()
        for tier, (key_at_low, value_at_low) in zip(self.tiers, self.kinds, strict=True):
            take = (key_low == key_at_low) & (value_low == value_at_low)
            keys, values = moving["keys"][take], moving["values"][take]
            extra = {n: d[take] for n, d in moving.items() if n not in KV_FIELDS}
            tier.add(keys, values, segments[take], channel_scale, extra)
        res.keep_rows(~chosen)
        self._invalidate()


def tier_kinds(scheme: KVQuantScheme) -> list[tuple[bool, bool]]:
    """The tiers a scheme needs, as (keys at low bits, values at low bits), the all-high tier first.

    Keys and values rank rows by the same saliency, so the smaller low set lies inside the larger: rows
    with only their values at low bits exist when ``value_ratio > key_ratio``, and conversely.
    """
    key_ratio, value_ratio = scheme.key_ratio, scheme.value_ratio
    kinds = [(False, False)]
    if value_ratio > key_ratio:
        kinds.append((False, True))
    if key_ratio > value_ratio:
        kinds.append((True, False))
    if min(key_ratio, value_ratio) > 0:
        kinds.append((True, True))
    return kinds


def _saliency_rank(scores: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """(S, T) long: each ``select`` ed slot's rank by ascending score among its segment's selected slots
    (ties in slot order); slots outside ``select`` rank after them."""
    ranked = scores.float().masked_fill(~select, float("inf"))
    return torch.empty_like(ranked, dtype=torch.long).scatter_(
        1,
        ranked.argsort(dim=-1, stable=True),
        torch.arange(ranked.shape[-1], device=ranked.device).expand_as(ranked),
    )
