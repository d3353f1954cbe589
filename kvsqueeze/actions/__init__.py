"""Actions: what happens to a low-score row. This release: evict (free it)."""

from kvsqueeze.actions.evict import protected_rows, select_rows

__all__ = ["protected_rows", "select_rows"]
