"""MPCache (Zeng et al., NeurIPS'25, arXiv 2501.06807), plaintext: static eviction, then hierarchical
query-aware selection at every decode step.

1. Once, after the prompt (look-once static eviction): a row's score is the most attention any of the last
   ``observation = 20%`` of the prompt's queries (10% above 24,000 tokens) pays it, averaged over all query
   heads, so one set of rows per layer is kept for every KV head (:mod:`~kvsqueeze.scorers.observation_peak`;
   scaled and causal, as spec B §2 recommends over the reference). The layer keeps ``static_keep`` of the
   prompt (spec B's ``static_keep_ratio``), the observation window always among them; or, with
   ``threshold`` set, the rows scoring at least tau (the paper's rule; ``static_keep`` is then a cap, 1.0 for
   none).
2. At every one-token decode step, over the survivors and every generated row: clusters of ``coarse = 32``
   tokens, then ``fine = 16``, each summarized by per-channel key minimum ``m`` and maximum ``M``, scored by
   ``q . (alpha M + (1 - alpha) m)`` with ``alpha = 0.6`` (GQA: summed over the group). The top
   ``coarse_ratio = 0.5`` of the coarse clusters (rho_1; never fewer than the fine pages need), with the
   first and the last, make their fine clusters eligible; the step attends to the rows of the best
   ``max(3, budget // 16)`` of those, the first and the newest always among them
   (:class:`~kvsqueeze.actions.select.Select`).

The budget is the tokens each decode step attends to (a ratio of the prompt or a count), as Quest's: the
paper's fine level takes rho_2 = 0.2 of the clusters, which the budget replaces. Memory: the static
survivors plus the bounds of both levels (``2 / fine + 2 / coarse`` of the keys' count, in fp16; a step
reads the coarse bounds and the chosen clusters' fine ones, not every fine cluster's). Prompt and
multi-token calls attend densely; ``dense_layers`` (the paper's ``skip_first2layers``, off) layers never
select. Cross-layer index sharing (the paper's; absent from its released code) is not implemented: every
layer selects its own clusters, since each layer's static eviction keeps other rows and one layer's cluster
indices name other tokens in the next.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.actions.select import BOUNDS_DTYPES, Select
from kvsqueeze.allocators.heads import ThresholdHeads, UniformHeads
from kvsqueeze.allocators.prompt_share import PromptShareAllocator
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.observation_peak import ObservationPeakScorer


@register
@dataclass
class MPCache(Method):
    """Static eviction by late-query attention, then hierarchical cluster selection per decode step."""

    name = "mpcache"
    summary = (
        "static eviction by the last 20% of prompt queries, then each decode step attends to "
        "hierarchically chosen 32/16-token clusters (query-aware)"
    )
    static_keep: float = 0.5
    threshold: float | None = None
    observation: float = 0.2
    alpha: float = 0.6
    coarse: int = 32
    fine: int = 16
    coarse_ratio: float = 0.5
    dense_layers: int = 0
    min_pages: int = 3
    bounds_dtype: str = "float16"

    def validate(self) -> None:
        super().validate()
        if not 0 < self.observation <= 1:
            raise ValueError(f"mpcache: observation must be in (0, 1], got {self.observation}")
        if not self.observation <= self.static_keep <= 1:
            raise ValueError(
                f"mpcache: static_keep must be in [observation, 1] = [{self.observation:g}, 1] (the observation "
                f"window is always kept), got {self.static_keep}"
            )
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"mpcache: alpha must be in [0, 1], got {self.alpha}")
        if self.fine < 1 or self.coarse < self.fine or self.coarse % self.fine:
            raise ValueError(
                f"mpcache: coarse ({self.coarse}) must be a positive multiple of fine ({self.fine})"
            )
        if not 0 < self.coarse_ratio <= 1:
            raise ValueError(f"mpcache: coarse_ratio must be in (0, 1], got {self.coarse_ratio}")
        if self.min_pages < 2:
            raise ValueError(
                f"mpcache: min_pages must be >= 2 (the first and the newest), got {self.min_pages}"
            )
        if self.bounds_dtype not in BOUNDS_DTYPES:
            raise ValueError(
                f"mpcache: bounds_dtype must be one of {', '.join(BOUNDS_DTYPES)}, got {self.bounds_dtype!r}"
            )

    def components(self) -> Components:
        scorer = ObservationPeakScorer(share=self.observation, long_share=min(self.observation, 0.1))
        heads = UniformHeads() if self.threshold is None else ThresholdHeads(self.threshold)
        select = Select(
            page_size=self.fine,
            score="linear",
            alpha=self.alpha,
            coarse=self.coarse // self.fine,
            coarse_ratio=self.coarse_ratio,
            dense_layers=self.dense_layers,
            min_pages=self.min_pages,
            bounds_dtype=self.bounds_dtype,
        )
        return Components(scorer, PromptShareAllocator(self.static_keep), heads=heads, select=select)
