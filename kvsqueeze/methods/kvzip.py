"""KVzip (Kim et al., NeurIPS'25, arXiv 2505.23416): keep what the model needs to repeat the context.

Query-agnostic: after the prompt, the cache replays it after "Repeat the previous context exactly." in
chunks of 2048 tokens (:mod:`kvsqueeze.cache.replay`); a row scores the largest attention any replay query
pays it, the softmax of each chunk's replay running over the 4 sinks, that chunk and the replay itself
(:mod:`kvsqueeze.scorers.reconstruction`). One top-k over all layers and KV heads then keeps
``budget x layers x KV heads`` rows per sequence (KVzip's non-layerwise selection), so heads and layers keep
what their scores earn. The first 4 positions always stay; the chat template's header (system prompt, the
user turn's opening), which no replay repeats, scores 0 as in KVzip's code and kvpress, and
``keep_header=True`` keeps it whole instead, in every head of every layer, which at keep 0.1 spends budget
the facts need (the query_agnostic blocks of docs/RESULTS.md measure both; the default agrees with kvpress's
KVzip sample by sample).

Defaults are the official code's and kvpress's ``KVzipPress``: ``chunk_size=2048``, ``sinks=4``, 8 tokens
of the previous chunk quoted in later rounds. Unlike kvpress, which masks evicted rows and keeps their bytes,
the rows are freed (stored ragged per head), and left-padded batches work. The replay costs about one more
prefill; ``kvzap`` predicts these scores inside the one prefill instead. Needs the model and its tokenizer
(``SqueezeCache(model, "kvzip", 0.25, tokenizer=tokenizer)``; ``kvsqueeze.generate`` passes both) and
full-attention layers (not Gemma 3's sliding ones).

``plus=True`` scores KVzip+ (the KVzap paper's teacher, kvpress's ``kvzip_plus_normalization``): each replay
attention is weighed by ``||W_O v||`` of the row over ``||h||`` of the query's input, so a row that draws
attention but writes little ranks low.

``floor=0.25`` gives every (layer, KV head) its best quarter of the average budget before the one top-k
ranks the rest. Scores differ in scale from layer to layer, and the plain top-k follows the scale: on
Qwen2.5-Coder-0.5B at keep 0.1 (``kvzap``, variable_tracking sample 0, ``scripts/kept_rows.py
variable_tracking 0 kvzap@0.1``) layer 16 keeps 8044 of its 8196 rows while 10 of the 24 layers keep at
most 80, and with them almost none of the facts. The default is KVzip's (0). The floor is measured on
``kvzap`` (the query_agnostic blocks of docs/RESULTS.md, ``scripts/query_agnostic_report.py``) and, on
SmolLM2-135M only, on ``kvzip(plus=True)``, where neither 0.25 nor 0.5 gained.

With the question inside the compressed prompt (query-aware), a replay scores the question like any context
it repeats, and at keep 0.1 it is often evicted (the kept-needle block of docs/RESULTS.md): ``window=16``
always keeps the prompt's last rows, as ``kvzap`` does (query-aware at keep 0.1 on the 4k suite, with
``keep_header=True``: 60 against 33 without it, docs/RESULTS.md's query_agnostic block). The default keeps
none, as KVzip's code and kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.allocators.global_topk import GlobalTopK
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.reconstruction import ReconstructionScorer


@register
@dataclass
class KVzip(Method):
    """Rows ranked by the attention a replay of the context pays them; one top-k over all layers and heads."""

    name = "kvzip"
    summary = "context-reconstruction scores, one top-k over layers and heads (query-agnostic; replays)"
    chunk_size: int = 2048
    sinks: int = 4
    overlap: int = 8
    keep_header: bool = False  # True: the template's header always stays (scored +inf, not 0)
    window: int = 0  # the last rows always kept: 16 keeps a question asked inside the prompt, as kvzap does
    plus: bool = False  # KVzip+: attention x ||W_O v|| / ||h||
    floor: float = 0.0  # every (layer, head) keeps at least this share of the average budget (0: plain top-k)

    def validate(self) -> None:
        super().validate()
        if self.chunk_size < 1:
            raise ValueError(f"kvzip: chunk_size must be >= 1, got {self.chunk_size}")
        if self.window < 0:
            raise ValueError(f"kvzip: window must be >= 0, got {self.window}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"kvzip: floor must be in [0, 1], got {self.floor}")

    def components(self) -> Components:
        return Components(
            ReconstructionScorer(self.chunk_size, self.sinks, self.overlap, self.keep_header, self.plus),
            GlobalTopK(sinks=self.sinks, window=self.window, floor=self.floor),
            sinks=self.sinks,
            window=self.window,
        )
