"""The full cache: nothing is compressed. The reference every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.methods.base import Components, Method, Schedule, register


@register
@dataclass
class Full(Method):
    """Keep every token (same tokens as a stock ``DynamicCache``, left padding excluded)."""

    name = "full"
    summary = "no compression (reference)"
    uses_budget = False

    def components(self) -> Components:
        return Components(scorer=None, allocator=None, schedule=Schedule.NEVER)
