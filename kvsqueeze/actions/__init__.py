"""Actions: what happens to a low-score row. See :mod:`kvsqueeze.actions.base`."""

from kvsqueeze.actions.base import Action
from kvsqueeze.actions.evict import Evict, protected_rows, select_rows
from kvsqueeze.actions.quantize import Quantize

ACTIONS: dict[str, type[Action]] = {cls.name: cls for cls in (Evict,)}

__all__ = ["ACTIONS", "Action", "Evict", "Quantize", "protected_rows", "select_rows"]
