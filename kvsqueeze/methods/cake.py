"""CAKE (Qin et al., ICLR'25): cascading, layer-preference budgets and a mean + variance indicator.

Defaults are the official code's (reference/eviction-methods.md §2e): window ``w=32``, ``gamma=200``,
average pooling with kernel 5, temperatures ``tau1=tau2=1`` (the fallback for models without a tuned
entry; the official per-model values, e.g. Qwen2.5-7B-Instruct (1.5, 0.6) at budget 1024, are passed as
``tau1``/``tau2``). The budget is the average per layer, window included.

During prefill each layer scores its prompt and records its preference; every layer seen so far is then
re-sized (cascading), so the cache stays near the budget while the prompt is read. At every decode step
each layer over its budget evicts the row the current query attends to least (pooled), once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.cake import CakeAllocator
from kvsqueeze.methods.base import Components, Method, Schedule, register
from kvsqueeze.scorers.cake_indicator import CakeIndicatorScorer


@register
@dataclass
class Cake(Method):
    """Layer budgets from attention entropy and variance, cascaded over prefill; decode-time eviction."""

    name = "cake"
    summary = "layer-preference budgets, cascading prefill, mean+variance indicator (every step)"
    window: int = 32
    gamma: float = 200.0
    kernel: int = 5
    tau1: float = 1.0
    tau2: float = 1.0
    cascade: bool = True

    def validate(self) -> None:
        super().validate()
        if self.tau1 <= 0 or self.tau2 <= 0:
            raise ValueError(f"cake: tau1 and tau2 must be > 0, got {self.tau1}, {self.tau2}")

    def components(self) -> Components:
        return Components(
            CakeIndicatorScorer(self.window, self.gamma, self.kernel),
            CakeAllocator(self.window, self.tau1, self.tau2, self.cascade),
            schedule=Schedule.EVERY_STEP,
            window=self.window,
        )
