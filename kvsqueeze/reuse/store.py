"""A byte-bounded LRU store of KV segments, keyed by token hash, keys held before RoPE.

A segment's KV is computed once, alone (after a fixed header that is then dropped, so the attention sink
matches), and stored with its keys turned back to before RoPE: placing it at any offset is then one RoPE
turn (:mod:`kvsqueeze.reuse.rope_shift`). The store holds at most ``max_bytes`` of tensors, measured from
what it stores; putting a segment past that evicts the least recently used ones first (a segment larger
than the whole bound is not kept). With ``bits`` set, keys and values are stored quantized per token
(asymmetric, groups of ``group_size`` channels, spec B §0) and dequantized when fetched.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvsqueeze.quantization.quantizer import QuantizedTensor, quantize


@dataclass
class SegmentKV:
    """The KV of one segment of ``T`` tokens over all layers, one sequence.

    ``keys`` are pre-RoPE (turned back by the positions they were computed at), ``values`` as computed.
    """

    keys: torch.Tensor  # (L, H_kv, T, D)
    values: torch.Tensor  # (L, H_kv, T, D)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def token_key(ids: torch.Tensor, header: torch.Tensor) -> str:
    """The store key of a token run ``ids`` (T,) computed after ``header`` (H,): a SHA-256 of both."""
    digest = hashlib.sha256()
    digest.update(header.to(torch.int64).numpy().tobytes())
    digest.update(b"|")
    digest.update(ids.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Entry:
    ids: torch.Tensor  # (T,)
    keys: torch.Tensor | QuantizedTensor
    values: torch.Tensor | QuantizedTensor

    def nbytes(self) -> int:
        total = self.ids.numel() * self.ids.element_size()
        for t in (self.keys, self.values):
            total += t.nbytes() if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()
        return total


class SegmentStore:
    """Segments' KV by token hash (and optional user ids), LRU-evicted past ``max_bytes``.

    Args:
        max_bytes: the bound on stored bytes (keys, values, their quantization parameters, token ids).
        bits: ``None`` stores tensors as given; 2, 4 or 8 stores them quantized per token.
        group_size: channels per quantization group (``None``: the whole head).
    """

    def __init__(self, max_bytes: int = 2**30, *, bits: int | None = None, group_size: int | None = None):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if bits is not None and bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4, 8 or None, got {bits}")
        self.max_bytes = int(max_bytes)
        self.bits = bits
        self.group_size = group_size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._ids: dict[str, str] = {}  # user id -> token key
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def nbytes(self) -> int:
        """Bytes held now, measured from the stored tensors."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def resolve(self, segment_id: str) -> str:
        """The token key a user id names; a one-line ``ValueError`` for an unknown id."""
        key = self._ids.get(segment_id)
        if key is None or key not in self._entries:
            raise ValueError(f"unknown segment id {segment_id!r}: add its text first (Segment(text, id=...))")
        return key

    def ids_of(self, key: str) -> torch.Tensor:
        """The token ids stored under ``key``."""
        return self._entries[key].ids

    def name(self, segment_id: str, key: str) -> None:
        """Let ``segment_id`` refer to the stored segment ``key``."""
        self._ids[segment_id] = key

    def get(self, key: str) -> SegmentKV | None:
        """The segment under ``key`` (dequantized if stored quantized), marked recently used; or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return SegmentKV(_unpack(entry.keys), _unpack(entry.values))

    def put(self, key: str, ids: torch.Tensor, kv: SegmentKV) -> bool:
        """Store ``kv`` under ``key``, evicting least recently used segments to stay within the bound.

        Returns False (and stores nothing) when the segment alone exceeds ``max_bytes``.
        """
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes()
        entry = _Entry(ids.clone(), self._pack(kv.keys), self._pack(kv.values))
        size = entry.nbytes()
        if size > self.max_bytes:
            return False
        while self._bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes()
        self._entries[key] = entry
        self._bytes += size
        return True

    def copy(self) -> SegmentStore:
        """A store holding the same segments (tensors shared, not copied) with its own LRU order."""
        other = SegmentStore(self.max_bytes, bits=self.bits, group_size=self.group_size)
        other._entries = OrderedDict(self._entries)
        other._ids = dict(self._ids)
        other._bytes = self._bytes
        return other

    def clear(self) -> None:
        self._entries.clear()
        self._ids.clear()
        self._bytes = 0

    def _pack(self, x: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        if self.bits is None:
            return x.clone()
        return quantize(x, self.bits, "token", self.group_size)

    def __repr__(self) -> str:
        return (
            f"SegmentStore({len(self)} segments, {self._bytes} of {self.max_bytes} bytes, bits={self.bits})"
        )


def _unpack(x: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    return x.dequantize(torch.float32) if isinstance(x, QuantizedTensor) else x
