"""Actions: what happens to a low-score row. See :mod:`kvsqueeze.actions.base`."""

from kvsqueeze.actions.base import Action
from kvsqueeze.actions.evict import Evict, protected_rows, select_rows

ACTIONS: dict[str, type[Action]] = {cls.name: cls for cls in (Evict,)}

__all__ = ["ACTIONS", "Action", "Evict", "protected_rows", "select_rows"]
