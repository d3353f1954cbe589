"""``kvsqueeze tune``: per-layer budgets searched by EvoPress (Sieberling et al., ICML'25, arXiv 2410.14649).

Every allocator in :mod:`kvsqueeze.allocators` is a rule of thumb. The tuner searches instead: a layer's
kept ratio is ``level x budget / steps_per_layer``, the levels sum to ``layers x steps_per_layer`` (so the
mean ratio, the bytes, is the budget exactly), and the (1 + lambda) search of
:mod:`~kvsqueeze.tune.evolution` moves levels between layers to lower the KL against the full cache on
offline calibration documents (:mod:`~kvsqueeze.tune.calibration`). The result is a
:class:`~kvsqueeze.methods.profiled.LayerProfile`, so ``--profile`` and :func:`~kvsqueeze.with_profile`
take it with any method.

    profile, result = tune_profile(model, tokenizer, get_method("snapkv"), 0.1)
    profile.save("snapkv-0.1.json")

A quantizing method's bit widths per layer (keys and values apart) are searched the same way under a byte
budget by :func:`~kvsqueeze.tune.bits.tune_bits` (``kvsqueeze tune --method kivi --bytes 0.22``).
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.methods.base import Method
from kvsqueeze.methods.profiled import LayerProfile
from kvsqueeze.tune.bits import check_bits_tunable, tune_bits
from kvsqueeze.tune.bitspace import BitSpace
from kvsqueeze.tune.calibration import calibration_samples, fitness_key, profile_loss
from kvsqueeze.tune.evolution import SearchConfig, SearchResult, evolve
from kvsqueeze.tune.levels import LevelSpace

__all__ = [
    "BitSpace",
    "LevelSpace",
    "SearchConfig",
    "SearchResult",
    "check_bits_tunable",
    "evolve",
    "tune_bits",
    "tune_profile",
]


def check_tunable(method: Method, budget: float) -> None:
    """A one-line ``ValueError`` unless ``method`` has per-layer budgets to search at ``budget``."""
    if not method.uses_budget or method.components().allocator is None:
        bits = "; to search its bits per layer give --bytes" if method.components().quantize else ""
        raise ValueError(
            f"tune: {method.name} keeps no budget per layer to search; pick a method that evicts (snapkv, "
            f"pyramidkv, h2o, ...){bits}"
        )
    if not 0 < budget < 1:
        raise ValueError(f"tune: --budget must be a ratio in (0, 1), got {budget}")


def tune_profile(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    budget: float,
    *,
    steps_per_layer: int = 4,
    documents: int = 8,
    context_tokens: int = 2048,
    continuation_tokens: int = 32,
    config: SearchConfig | None = None,
    state_path: str | Path | None = None,
    model_name: str = "",
    progress: bool = True,
) -> tuple[LayerProfile, SearchResult]:
    """Search per-layer keep ratios of ``method`` averaging ``budget``; returns the profile and the search.

    Each layer's ratio is a multiple of ``budget / steps_per_layer`` between one step and 1 (so the search
    can move a quarter of the budget at a time with the default). Fitness is the mean KL over the last
    ``continuation_tokens`` of ``documents`` offline documents of ``context_tokens`` tokens each, each
    prefilled once. ``state_path`` makes the search resumable.
    """
    config = config or SearchConfig()
    check_tunable(method, budget)
    if steps_per_layer < 1:
        raise ValueError(f"tune: steps_per_layer must be >= 1, got {steps_per_layer}")
    step = budget / steps_per_layer
    lowest = math.ceil(step * context_tokens)  # what a layer at level 1 keeps of a calibration document
    protected = method.components().min_budget()
    if lowest < protected:
        raise ValueError(
            f"tune: a layer at one step ({budget}/{steps_per_layer} of {context_tokens} tokens = {lowest}) keeps "
            f"fewer rows than {method.name} protects ({protected}); raise --budget or "
            "--context-tokens, or lower --steps-per-layer"
        )
    space = LevelSpace(
        num_layers=model.config.get_text_config().num_hidden_layers,
        start=steps_per_layer,
        max_level=max(steps_per_layer, math.floor(1 / step + 1e-9)),
    )
    samples = calibration_samples(
        model, tokenizer, documents, context_tokens, continuation_tokens, progress=progress
    )

    def ratios(levels: tuple[int, ...]) -> list[float]:
        return [min(1.0, v * step) for v in levels]

    def loss(levels: tuple[int, ...], ids: list[int]) -> float:
        return profile_loss(model, [samples[i] for i in ids], method, budget, ratios(levels))

    key = fitness_key(model, method, budget, documents, context_tokens, continuation_tokens)
    result = evolve(
        space, loss, len(samples), config, state_path=state_path, fitness_key=key, progress=progress
    )
    profile = LayerProfile(
        keep_ratios=[round(r, 6) for r in ratios(result.levels)],
        model=model_name,
        method=method.name,
        budget=budget,
        num_prompts=len(samples),
        prompt_tokens=[context_tokens] * len(samples),
        search=result.record(
            config,
            continuation_tokens,
            kl=result.loss,
            uniform_kl=result.start_loss,
            levels=list(result.levels),
            steps_per_layer=steps_per_layer,
        ),
    )
    return profile, result
