"""Quest (Tang et al., ICML'24, arXiv 2406.10774): query-aware page selection; nothing is evicted.

Every row stays. Rows are grouped in pages of ``page_size = 16`` consecutive tokens, each summarized by the
per-channel minimum and maximum of its keys; at every one-token decode step each KV head scores its pages by
``sum_i max(q_i M_i, q_i m_i)`` (an upper bound of ``q . k`` in the page; GQA: summed over the group) and
attends to the rows of the best ``max(3, budget // 16)`` pages only, the first page (attention sinks) and the
newest page (the current token) always among them (``group="max"``: a page scores its best query head's bound
relative to that head's best page instead, see :mod:`kvsqueeze.actions.select`). Spec B §4.1; defaults from
the official code (mit-han-lab/Quest): page size 16, at least 3 pages, the prompt and the first
``dense_layers = 2`` layers dense. A call of several tokens after the prompt (a question, a chunk) attends
densely too, as Quest's prefill does; sliding-window layers (Gemma 3) attend densely to their window.

Page size trades accuracy for speed. On the 4k suite (Qwen2.5-Coder-0.5B, query-agnostic, keep 0.25, 3 samples
per task) 16-token pages score 11 points under the full cache, all of it on kv_retrieval (a uuid is copied
right for 5 to 12 characters, then drifts) and common_words; ``page_size=4`` is 0.3 under, at KL 0.010 against
0.187; ``page_size=8`` is 6.7 under (kv_retrieval and common_words again). A step reads every page's
bounds (fp16: half an fp32 cache's key bytes at page 4) and the chosen rows: at 16k tokens and 10% selected,
0.36x the full cache's attention time per step with 4-token pages, 0.32x with 8 and 0.29x with 16
(docs/RESULTS.md, blocks selection and selection_speed). The default stays the paper's 16.

The budget is the tokens each step attends to: a ratio of the prompt or a token count (the cache's
budget, or ``select_ratio`` / ``select_tokens``, which composed methods need: ``snapkv+quest`` evicts to
the cache's budget, then attends to ``select_ratio`` of the prompt per step). ``quest+kivi`` (or
``kivi+quest``) selects over KIVI's quantized rows; the layer still dequantizes all of them each step, so
that composition saves bytes and attention, not dequantization. Memory: every row plus the page bounds,
``2 / page_size`` of the keys' count in fp16 (``bounds_dtype="float32"``: twice that; ``SqueezeCache.nbytes``
counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.actions.select import BOUNDS_DTYPES, GROUP_REDUCTIONS, Select, check_selection_budget
from kvsqueeze.methods.base import Components, Method, Schedule, register


@register
@dataclass
class Quest(Method):
    """Every row kept; each decode step attends to its top pages by Quest's key-bound score."""

    name = "quest"
    summary = (
        "keeps every row; each decode step attends to the top 16-token pages by a key bound (query-aware)"
    )
    page_size: int = 16
    dense_layers: int = 2
    min_pages: int = 3
    group: str = "sum"
    bounds_dtype: str = "float16"
    select_ratio: float | None = None
    select_tokens: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.page_size < 1:
            raise ValueError(f"quest: page_size must be >= 1, got {self.page_size}")
        if self.min_pages < 2:
            raise ValueError(
                f"quest: min_pages must be >= 2 (the sinks' page and the newest), got {self.min_pages}"
            )
        if self.group not in GROUP_REDUCTIONS:
            raise ValueError(f"quest: group must be one of {', '.join(GROUP_REDUCTIONS)}, got {self.group!r}")
        if self.bounds_dtype not in BOUNDS_DTYPES:
            raise ValueError(
                f"quest: bounds_dtype must be one of {', '.join(BOUNDS_DTYPES)}, got {self.bounds_dtype!r}"
            )
        check_selection_budget(self.name, self.select_ratio, self.select_tokens)

    def components(self) -> Components:
        select = Select(
            page_size=self.page_size,
            score="bound",
            dense_layers=self.dense_layers,
            min_pages=self.min_pages,
            group=self.group,
            bounds_dtype=self.bounds_dtype,
            ratio=self.select_ratio,
            tokens=self.select_tokens,
        )
        return Components(scorer=None, allocator=None, schedule=Schedule.NEVER, select=select)
