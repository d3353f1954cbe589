"""KVzap (Jegou et al., 2026, arXiv 2601.07891): KVzip's scores, predicted inside the one prefill.

Per layer, a linear map (or a two-layer MLP) from the hidden state a token enters attention with to the log
of its KVzip score, one output per KV head (:class:`~kvsqueeze.scorers.learned.LearnedScorer`). It runs in
the normal prefill at the cost of one small matmul per layer, so compression costs almost nothing over a
plain prefill, and it needs no question: query-agnostic, like KVzip. The same top-k over all layers and KV
heads as ``kvzip`` picks the rows; the first ``sinks=4`` positions and the last ``window=16`` rows always
stay (kvpress's KVzap keeps a recent window too; it thresholds scores, here a budget is kept).

The weights are fitted per model by ``kvsqueeze calibrate --model M --method kvzap`` (native ``kvzip`` run on
offline documents, :mod:`kvsqueeze.calibrate`) and found by the model's fingerprint; the packaged models'
weights ship with kvsqueeze (:mod:`kvsqueeze.weights`). ``weights=PATH`` takes a file explicitly.

``plus=True`` uses weights fitted to KVzip+ scores instead (``kvzip(plus=True)``: replay attention weighed by
``||W_O v|| / ||h||``, the targets of the KVzap paper), made by ``kvsqueeze calibrate --teacher kvzip+`` and
kept apart from the KVzip-fitted ones (``kvzap_plus`` in the user cache and the package). ``mlp=True`` uses
the two-layer MLP student (``calibrate --student mlp``, kept as ``kvzap_mlp`` / ``kvzap_plus_mlp``).
``floor`` gives every layer and head a share of the budget first, as in ``kvzip``. On Qwen2.5-Coder-0.5B's 4k
query-agnostic suite (30 samples, ``scripts/query_agnostic_report.py``) ``floor=0.25`` lifted ``plus=True``
by 7.3 points at keep 0.25 and 8.0 at 0.1, and plain kvzap by 3.7 and 4.0 (``floor=0.5``: +5.0 and -4.0 for
``plus=True``). On SmolLM2-135M ``floor=0.5`` lifted ``plus=True`` by 8.2 at 0.25, but both floors cost it 10
to 12 points at 0.1. The best floor depends on the model and the ratio, so it stays off by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from kvsqueeze.allocators.global_topk import GlobalTopK
from kvsqueeze.methods.base import Components, Method, register
from kvsqueeze.scorers.learned import LearnedScorer, ScorerWeights


def weights_name(plus: bool, mlp: bool = False) -> str:
    """Where kvzap's weights live (user cache folder, shipped file prefix): by the scores they were fitted to
    (``kvzap``, ``kvzap_plus``), with ``_mlp`` for the MLP student."""
    return ("kvzap_plus" if plus else "kvzap") + ("_mlp" if mlp else "")


def variant_label(plus: bool, mlp: bool) -> str:
    """How the bench and the CLI name a kvzap variant: ``kvzap``, ``kvzap(plus=True)``, ``kvzap(mlp=True,plus=True)``."""
    options = [name for name, on in (("mlp", mlp), ("plus", plus)) if on]
    return f"kvzap({','.join(f'{o}=True' for o in options)})" if options else "kvzap"


@register
@dataclass
class KVzap(Method):
    """Learned per-layer scores from hidden states; one top-k over all layers and heads (prefill)."""

    name = "kvzap"
    summary = "learned KVzip scores from hidden states, one top-k over layers and heads (query-agnostic)"
    sinks: int = 4
    window: int = 16
    weights: str = ""  # a weights file; "" finds the calibrated or shipped weights of the model
    plus: bool = False  # weights fitted to KVzip+ scores (calibrate --teacher kvzip+) instead of KVzip's
    mlp: bool = False  # the two-layer MLP student (calibrate --student mlp) instead of the linear one
    floor: float = 0.0  # every (layer, head) keeps at least this share of the average budget (0: plain top-k)
    # the loaded weights (set by `for_model`, not a hyperparameter)
    fitted: ScorerWeights | None = field(default=None, repr=False, compare=False, metadata={"internal": True})

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"kvzap: floor must be in [0, 1], got {self.floor}")

    def for_model(self, model: torch.nn.Module | None) -> Method:
        if self.fitted is not None:
            return self
        if self.weights:
            return dataclasses.replace(self, fitted=ScorerWeights.load(self.weights))
        if model is None:
            raise ValueError(
                "kvzap finds its scorer weights by the model's weights: build the cache with the model"
            )
        from kvsqueeze.models.fingerprint import model_fingerprint
        from kvsqueeze.weights import find_scorer_weights

        fingerprint = model_fingerprint(model)
        fitted = find_scorer_weights(weights_name(self.plus, self.mlp), fingerprint)
        if fitted is None:
            flags = " --teacher kvzip+" * self.plus + " --student mlp" * self.mlp
            raise ValueError(
                f"no {variant_label(self.plus, self.mlp)} scorer weights for this model (fingerprint {fingerprint}); fit them with "
                f"`kvsqueeze calibrate --model MODEL --method kvzap{flags}`"
            )
        return dataclasses.replace(self, fitted=fitted)

    def components(self) -> Components:
        scorer = LearnedScorer(self.fitted) if self.fitted is not None else None
        return Components(
            scorer,
            GlobalTopK(sinks=self.sinks, window=self.window, floor=self.floor),
            sinks=self.sinks,
            window=self.window,
        )
