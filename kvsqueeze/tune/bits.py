"""``kvsqueeze tune --bytes``: bit widths per layer, keys and values apart, searched under a byte budget.

The units are each layer's keys and each layer's values; a unit takes 2, 4 or 8 bits, and the bytes of
all units stay at or under ``bytes_ratio`` x an fp16 cache of the same tokens (:class:`BitSpace`; its
module says why the mutation repairs to the budget instead of moving equal-cost steps). A unit's bytes at
each width are measured by :func:`~kvsqueeze.quantization.budget.stored_bytes`, the cache's own storage
(:class:`~kvsqueeze.cache.tiered.TieredRows`) of a ``context_tokens``-token block quantized with the
method's scheme at that width, codes and parameters (KIVI's full-precision residual is not counted, as in
:func:`~kvsqueeze.quantization.budget.bytes_per_token`). Every layer is counted as storing every token.

What the bits mean (:meth:`~kvsqueeze.actions.quantize.Quantize.scheme_for`):

* ``kivi``: every quantized key of the layer at its key bits, every value at its value bits (KIVI's
  ``bits`` is replaced; groups and the residual stay);
* ``zipcache``: the bits of the layer's salient set, keys and values apart (ZipCache's ``bits``); the
  least salient set stays at ``low_bits`` (2), with the method's ``key_low_ratio`` and ``value_low_ratio``.

The search is :func:`~kvsqueeze.tune.evolution.evolve` from :meth:`BitSpace.uniform` (the highest width
that fits every unit, plus one width more for keys, then values, layer by layer, while the budget allows:
keys and early layers are the sensitive ones), with the fitness of keep-ratio tuning
(:func:`~kvsqueeze.tune.calibration.method_loss`: KL against the full cache over offline continuations,
one recorded prefill per document). A pure quantizer's continuation is fed as one chunk when that is exact
(:func:`~kvsqueeze.tune.calibration.continuation_in_one_chunk`): its cache only changes when the residual
fills a block (100 or 128 rows), and until then one chunk attends to the same rows a token-by-token decode
does, at a tenth of the cost (Qwen2.5-Coder-0.5B, zipcache, 2048 + 32 tokens, one thread: 0.8 s against
8.2 s, KL 0.0133499 either way).
The result is a :class:`~kvsqueeze.methods.profiled.LayerProfile` with ``key_bits`` and ``value_bits``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.methods.base import Method
from kvsqueeze.methods.profiled import LayerProfile, with_profile
from kvsqueeze.quantization.budget import fp16_bytes_per_token, stored_bytes
from kvsqueeze.quantization.packing import SUPPORTED_BITS
from kvsqueeze.text_config import head_dim_of
from kvsqueeze.tune.bitspace import BitSpace
from kvsqueeze.tune.calibration import calibration_samples, fitness_key, method_loss
from kvsqueeze.tune.evolution import SearchConfig, SearchResult, evolve


def check_bits_tunable(method: Method, bytes_ratio: float, budget: float = 1.0) -> None:
    """A one-line ``ValueError`` unless ``method`` quantizes, ``bytes_ratio`` is a share in (0, 1) and,
    for a method that evicts first, ``budget`` is a keep ratio in (0, 1]."""
    if method.components().quantize is None:
        raise ValueError(
            f"tune: {method.name} does not quantize, so --bytes has no bits to search; pick kivi, zipcache "
            "or EVICTION+kivi (or --budget alone for an evicting method)"
        )
    if not 0 < bytes_ratio < 1:
        raise ValueError(
            f"tune: --bytes must be a share of the fp16 cache's bytes in (0, 1), got {bytes_ratio}"
        )
    if method.uses_budget and not 0 < budget <= 1:
        raise ValueError(f"tune: --budget (what {method.name} keeps) must be a ratio in (0, 1], got {budget}")


def fp16_bytes(num_layers: int, tokens: int, head_dim: int) -> int:
    """Bytes an fp16 cache stores for ``tokens`` tokens per KV head over ``num_layers`` layers: what
    ``--bytes`` is a share of."""
    return num_layers * tokens * fp16_bytes_per_token(head_dim)


def bit_space(method: Method, num_layers: int, head_dim: int, bytes_ratio: float, tokens: int) -> BitSpace:
    """The candidates: keys of every layer, then values of every layer, each at 2, 4 or 8 bits, whose
    bytes for ``tokens`` tokens per KV head (measured, see the module) stay within ``bytes_ratio`` x fp16's.

    A one-line ``ValueError`` when even 2 bits everywhere is over the budget, or 8 bits everywhere within
    it (nothing to search).
    """
    check_bits_tunable(method, bytes_ratio)
    scheme = method.components().quantize.scheme
    costs = {
        name: tuple(
            stored_bytes(dataclasses.replace(scheme, **{bits_field: b}), tokens, head_dim, names=(name,))
            for b in SUPPORTED_BITS
        )
        for name, bits_field in (("keys", "key_bits"), ("values", "value_bits"))
    }
    full = fp16_bytes(num_layers, tokens, head_dim)
    budget = math.floor(bytes_ratio * full)
    lowest, highest = (num_layers * (costs["keys"][i] + costs["values"][i]) for i in (0, -1))
    if budget < lowest:
        raise ValueError(
            f"tune: --bytes {bytes_ratio} is under what {method.name} stores at 2 bits everywhere "
            f"({lowest / full:.4f}x fp16)"
        )
    if budget >= highest:
        raise ValueError(
            f"tune: at --bytes {bytes_ratio} every layer fits at 8 bits ({highest / full:.4f}x fp16); "
            "nothing to search"
        )
    units = (costs["keys"],) * num_layers + (costs["values"],) * num_layers
    return BitSpace(units, budget, SUPPORTED_BITS)


def tune_bits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    bytes_ratio: float,
    *,
    budget: float = 1.0,
    documents: int = 8,
    context_tokens: int = 2048,
    continuation_tokens: int = 32,
    config: SearchConfig | None = None,
    state_path: str | Path | None = None,
    model_name: str = "",
    progress: bool = True,
) -> tuple[LayerProfile, SearchResult]:
    """Search bits per layer of ``method``'s keys and values within ``bytes_ratio`` x fp16's bytes.

    ``budget`` is the keep ratio of a composed method's eviction (``h2o+kivi``), held fixed; a pure
    quantizer ignores it. The rest is as :func:`~kvsqueeze.tune.tune_profile`. Returns the profile (bits,
    no keep ratios) and the search.
    """
    config = config or SearchConfig()
    text = model.config.get_text_config()
    layers = text.num_hidden_layers
    check_bits_tunable(method, bytes_ratio, budget)
    space = bit_space(method, layers, head_dim_of(text), bytes_ratio, context_tokens)
    samples = calibration_samples(
        model, tokenizer, documents, context_tokens, continuation_tokens, progress=progress
    )

    def profile_of(bits: tuple[int, ...]) -> LayerProfile:
        return LayerProfile(key_bits=list(bits[:layers]), value_bits=list(bits[layers:]))

    def loss(bits: tuple[int, ...], ids: list[int]) -> float:
        profiled = with_profile(method, profile_of(bits))
        return method_loss(model, [samples[i] for i in ids], profiled, budget)

    key = fitness_key(model, method, budget, documents, context_tokens, continuation_tokens)
    key["bytes"] = bytes_ratio
    result = evolve(
        space, loss, len(samples), config, state_path=state_path, fitness_key=key, progress=progress
    )
    full = fp16_bytes(layers, context_tokens, head_dim_of(text))
    start = space.uniform()
    profile = dataclasses.replace(
        profile_of(result.levels),
        model=model_name,
        method=method.name,
        budget=budget if method.uses_budget else 0.0,
        num_prompts=len(samples),
        prompt_tokens=[context_tokens] * len(samples),
        search=result.record(
            config,
            continuation_tokens,
            target="bits",
            bytes=bytes_ratio,
            stored_bytes=round(space.cost(result.levels) / full, 6),
            start_bytes=round(space.cost(start) / full, 6),
            kl=result.loss,
            start_kl=result.start_loss,
            start_key_bits=list(start[:layers]),
            start_value_bits=list(start[layers:]),
        ),
    )
    return profile, result
