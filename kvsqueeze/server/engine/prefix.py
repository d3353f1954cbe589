"""Compressed context prefixes kept for reuse, least recently used first out.

A request that marks its system or document prefix cacheable has that prefix compressed once by a
query-agnostic method (``kvzap`` or ``kvzip``: they keep what any later question may need, not what the
end of the prefix attends to). Later requests with the same prefix tokens, method and budget continue a
copy of it (:meth:`SqueezeCache.copy`) with their own suffix, so they pay neither the prefix's prefill nor
its compression.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from kvsqueeze.cache.cache import SqueezeCache

QUERY_AGNOSTIC = ("kvzap", "kvzip", "full")


def prefix_key(method_key: str, prefix_ids: list[int]) -> str:
    """A short key for a prefix's tokens under one method, parameters and budget."""
    digest = hashlib.sha256(",".join(map(str, prefix_ids)).encode()).hexdigest()[:24]
    return f"{method_key}|{len(prefix_ids)}|{digest}"


class PrefixStore:
    """At most ``max_entries`` compressed prefixes (LRU); their bytes count against the KV memory."""

    def __init__(self, max_entries: int = 8) -> None:
        if max_entries < 0:
            raise ValueError(f"the prefix cache size must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, SqueezeCache] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> SqueezeCache | None:
        cache = self._entries.get(key)
        if cache is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return cache

    def put(self, key: str, cache: SqueezeCache) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = cache
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
