"""StreamingLLM (Xiao et al., ICLR'24): attention sinks plus a window of the latest tokens.

Defaults: 4 sink tokens (``start_size=4`` in the official code); the rest of the budget is the recent window.
By default this is the long-context baseline of KVCache-Factory and Ada-KV: compress once after the prompt,
keep absolute positions, then append while decoding. ``every_step=True`` keeps the cache at its budget
during decoding too (the original streaming behaviour, without re-rotating keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.uniform import UniformAllocator
from kvsqueeze.methods.base import Components, Method, Schedule, register
from kvsqueeze.scorers.position import PositionScorer


@register
@dataclass
class StreamingLLM(Method):
    """Keep the first ``sinks`` tokens and the most recent ones."""

    name = "streaming_llm"
    summary = "attention sinks + recent window (positional)"
    sinks: int = 4
    every_step: bool = False

    def components(self) -> Components:
        schedule = Schedule.EVERY_STEP if self.every_step else Schedule.PREFILL
        return Components(PositionScorer(), UniformAllocator(), schedule=schedule, sinks=self.sinks)
