"""Fitted weights of learned scorers: the ones shipped for the packaged models, and the user's own.

A learned scorer (``kvzap``) needs weights fitted for the exact model it runs on. They are looked up by the
model's fingerprint (:func:`kvsqueeze.models.fingerprint.model_fingerprint`):

1. the user's calibrated weights, ``<cache>/scorers/<method>/<fingerprint>.safetensors``, written by
   ``kvsqueeze calibrate --model M --method kvzap``;
2. the weights shipped in this folder for the packaged models (``<method>-<alias>.safetensors``, made by
   ``scripts/make_scorer_weights.py``), matched by the fingerprint in their metadata.

``<method>`` is ``kvzap`` for weights fitted to KVzip's scores and ``kvzap_plus`` for those fitted to KVzip+'s
(``calibrate --teacher kvzip+``, used by ``kvzap:plus=true``), either with ``_mlp`` for the MLP student
(``calibrate --student mlp``, used by ``kvzap:mlp=true``).
"""

from __future__ import annotations

from pathlib import Path

from kvsqueeze.models.registry import cache_dir
from kvsqueeze.scorers.learned import ScorerWeights

SHIPPED_DIR = Path(__file__).parent


def user_weights_path(method: str, fingerprint: str) -> Path:
    """Where ``kvsqueeze calibrate`` saves ``method``'s weights for the model with ``fingerprint``."""
    return cache_dir() / "scorers" / method / f"{fingerprint}.safetensors"


def shipped_weights(method: str) -> list[Path]:
    """The weight files shipped for ``method``, one per packaged model."""
    return sorted(SHIPPED_DIR.glob(f"{method}-*.safetensors"))


def find_scorer_weights(method: str, fingerprint: str) -> ScorerWeights | None:
    """The user's or the shipped weights of ``method`` for the model with ``fingerprint``, or None."""
    own = user_weights_path(method, fingerprint)
    if own.is_file():
        return ScorerWeights.load(own)
    for path in shipped_weights(method):
        weights = ScorerWeights.load(path)
        if weights.fingerprint == fingerprint:
            return weights
    return None
