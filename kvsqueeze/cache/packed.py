"""Packed ragged storage: the rows of many segments in one tensor per field.

A *segment* is one (sequence, KV head) pair of one layer: segment ``s = b * H_kv + h``. Each segment keeps
its own number of rows, so heads and sequences can hold different budgets and nothing is padded in memory.
Every field (keys, values, positions, per-row scores, ...) is a tensor of shape ``(N, *feature)`` where
``N = sum(lengths)`` and the rows of segment ``s`` sit at ``offsets[s] : offsets[s] + lengths[s]``, in
temporal order.

When all segments have the same length ``T`` the packed tensor *is* the dense ``(S, T, *feature)`` tensor,
so reading it is a free ``view`` and appending is one ``torch.cat``, as in ``transformers.DynamicCache``.
Ragged segments take an index-based path of the same cost order (one copy of the stored rows).

This module is plain PyTorch: no transformers import.
"""

from __future__ import annotations

import torch


class PackedRows:
    """Ragged per-segment rows of several named fields, packed along dimension 0."""

    def __init__(self, num_segments: int, device: torch.device | str = "cpu") -> None:
        self.num_segments = num_segments
        self.lengths = torch.zeros(num_segments, dtype=torch.long, device=device)  # (S,)
        self.fields: dict[str, torch.Tensor] = {}
        self._uniform_length: int | None = 0  # the common length when all segments are equal, else None

    # ------------------------------------------------------------------ reading

    @property
    def num_rows(self) -> int:
        return int(self.lengths.sum())

    @property
    def is_uniform(self) -> bool:
        return self._uniform_length is not None

    @property
    def max_length(self) -> int:
        if self._uniform_length is not None:
            return self._uniform_length
        return int(self.lengths.max()) if self.num_segments else 0

    def offsets(self) -> torch.Tensor:
        """Start row of each segment, shape (S,)."""
        return torch.cumsum(self.lengths, 0) - self.lengths

    def segment_of_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For every packed row: its segment and its index inside the segment, each (N,)."""
        return rows_of_segments(self.lengths)

    def has_field(self, name: str) -> bool:
        return name in self.fields

    def padded(self, name: str, fill: float = 0) -> torch.Tensor:
        """Field ``name`` as a dense (S, T_max, *feature) tensor; a view when segments are uniform."""
        return pad_rows(self.fields[name], self.lengths, self._uniform_length, fill)

    def valid_mask(self) -> torch.Tensor:
        """(S, T_max) bool: True where a padded slot holds a stored row."""
        t = torch.arange(self.max_length, device=self.lengths.device)
        return t[None, :] < self.lengths[:, None]

    def nbytes(self, names: tuple[str, ...] | None = None) -> int:
        """Bytes held by the given fields (all fields by default), measured from the tensors."""
        names = tuple(self.fields) if names is None else names
        return sum(self.fields[n].numel() * self.fields[n].element_size() for n in names if n in self.fields)

    def release(self) -> None:
        """Drop transient views built for one attention call (nothing to drop: fields are the storage)."""

    def clone(self) -> PackedRows:
        """An independent copy (fields cloned)."""
        copy = PackedRows(self.num_segments, device=self.lengths.device)
        copy.lengths = self.lengths.clone()
        copy.fields = {name: data.clone() for name, data in self.fields.items()}
        copy._uniform_length = self._uniform_length
        return copy

    # ------------------------------------------------------------------ writing

    def append(self, new: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> None:
        """Append new rows at the end of every segment.

        Args:
            new: per field, a tensor of shape (S, q, *feature). Every existing field must be present.
            keep: optional (S, q) bool; only rows marked True are stored (used to drop left padding).
        """
        if self.fields and set(new) != set(self.fields):
            raise ValueError(f"append() needs fields {sorted(self.fields)}, got {sorted(new)}")
        q = next(iter(new.values())).shape[1]
        if keep is None or bool(keep.all()):
            if self._uniform_length is not None:
                self._append_uniform(new, q)
                return
            keep = torch.ones(self.num_segments, q, dtype=torch.bool, device=self.lengths.device)
        self._append_ragged(new, keep)

    def _append_uniform(self, new: dict[str, torch.Tensor], q: int) -> None:
        t = self._uniform_length
        for name, rows in new.items():
            if name in self.fields:
                old = self.fields[name].view(self.num_segments, t, *rows.shape[2:])
                rows = torch.cat([old, rows.to(old.dtype)], dim=1)
            self.fields[name] = rows.reshape(-1, *rows.shape[2:])
        self.lengths += q
        self._uniform_length = t + q

    def _append_ragged(self, new: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        added = keep.sum(1)  # (S,)
        new_lengths = self.lengths + added
        new_offsets = torch.cumsum(new_lengths, 0) - new_lengths
        seg, within = self.segment_of_row()
        dest_old = new_offsets[seg] + within  # (N,)
        new_seg, new_col = keep.nonzero(as_tuple=True)
        rank = (torch.cumsum(keep, 1) - 1)[new_seg, new_col]
        dest_new = new_offsets[new_seg] + self.lengths[new_seg] + rank  # (M,)
        total = int(new_lengths.sum())
        for name, rows in new.items():
            out = rows.new_empty((total, *rows.shape[2:]))
            if name in self.fields:
                out = out.to(self.fields[name].dtype)
                out[dest_old] = self.fields[name]
            out[dest_new] = rows[new_seg, new_col].to(out.dtype)
            self.fields[name] = out
        self.lengths = new_lengths
        self._refresh_uniform()

    def append_rows(self, segments: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Append packed rows ``(M, *feature)`` per field at the end of their ``segments`` ``(M,)``.

        ``segments`` must be sorted (stable): the rows of one segment keep their order.
        """
        if self.fields and set(rows) != set(self.fields):
            raise ValueError(f"append_rows() needs fields {sorted(self.fields)}, got {sorted(rows)}")
        added = torch.bincount(segments, minlength=self.num_segments)  # (S,)
        new_lengths = self.lengths + added
        new_offsets = torch.cumsum(new_lengths, 0) - new_lengths
        seg, within = self.segment_of_row()
        dest_old = new_offsets[seg] + within  # (N,)
        rank = (
            torch.arange(segments.numel(), device=segments.device)
            - (torch.cumsum(added, 0) - added)[segments]
        )
        dest_new = new_offsets[segments] + self.lengths[segments] + rank  # (M,)
        total = int(new_lengths.sum())
        for name, data in rows.items():
            out = data.new_empty((total, *data.shape[1:]))
            if name in self.fields:
                out[dest_old] = self.fields[name].to(out.dtype)
            out[dest_new] = data
            self.fields[name] = out
        self.lengths = new_lengths
        self._refresh_uniform()

    def keep_rows(self, mask: torch.Tensor) -> None:
        """Keep the packed rows where ``mask`` ``(N,)`` is True, in their order; free the others."""
        seg, _ = self.segment_of_row()
        for name, data in self.fields.items():
            self.fields[name] = data[mask]
        self.lengths = torch.bincount(seg[mask], minlength=self.num_segments).to(self.lengths)
        self._refresh_uniform()

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the rows where ``mask`` (S, T_max) is True, in their current order; free the others."""
        seg, col = mask.nonzero(as_tuple=True)  # row-major: by segment, then in temporal order
        flat = self.offsets()[seg] + col
        for name, data in self.fields.items():
            self.fields[name] = data.index_select(0, flat)
        self.lengths = mask.sum(1).to(self.lengths)
        self._refresh_uniform()

    def select_segments(self, segments: torch.Tensor) -> None:
        """Keep whole segments, in the given order (for batch selection and beam reordering)."""
        lengths = self.lengths[segments]
        k = int(lengths.max()) if lengths.numel() else 0
        index = torch.arange(k, device=lengths.device).expand(len(segments), k)
        offsets = self.offsets()[segments]
        flat = (offsets[:, None] + index)[index < lengths[:, None]]
        for name, data in self.fields.items():
            self.fields[name] = data.index_select(0, flat)
        self.num_segments = len(segments)
        self.lengths = lengths.clone()
        self._refresh_uniform()

    def update_field(self, name: str, padded: torch.Tensor) -> None:
        """Write a (S, T_max, *feature) dense tensor back into the packed field ``name``."""
        if self._uniform_length is not None:
            self.fields[name] = padded.reshape(-1, *padded.shape[2:]).to(self.fields.get(name, padded).dtype)
            return
        seg, within = self.segment_of_row()
        self.fields[name] = padded[seg, within]

    def _refresh_uniform(self) -> None:
        if self.num_segments == 0:
            self._uniform_length = 0
            return
        lengths = self.lengths.tolist()
        lo, hi = min(lengths), max(lengths)
        self._uniform_length = lo if lo == hi else None


def pad_rows(
    data: torch.Tensor, lengths: torch.Tensor, uniform_length: int | None, fill: float = 0
) -> torch.Tensor:
    """Packed rows ``(N, *feature)`` of segments with ``lengths`` ``(S,)`` as dense ``(S, T_max, *feature)``.

    A view when every segment holds ``uniform_length`` rows; padding slots hold ``fill`` otherwise.
    """
    num_segments, feature = lengths.numel(), data.shape[1:]
    if uniform_length is not None:
        return data.view(num_segments, uniform_length, *feature)
    width = int(lengths.max()) if num_segments else 0
    out = data.new_full((num_segments, width, *feature), fill)
    out[rows_of_segments(lengths)] = data
    return out


def rows_of_segments(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the packed rows of segments with ``lengths`` ``(S,)``: each row's segment and index in it, (N,)."""
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    within = torch.arange(seg.numel(), device=seg.device) - (torch.cumsum(lengths, 0) - lengths)[seg]
    return seg, within
