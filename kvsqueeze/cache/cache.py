"""``SqueezeCache``: a ``transformers.Cache`` that stores only what its method keeps.

    model, tokenizer = kvsqueeze.load_model()
    cache = SqueezeCache(model, method="snapkv", budget=0.25)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    print(cache.nbytes(), "bytes kept of", cache.full_nbytes())

One cache serves one generation (one batch of sequences); build a new one, or call ``reset()``, for the next.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from kvsqueeze.attention.interface import enable
from kvsqueeze.cache.budget import Budget
from kvsqueeze.cache.group import LayerGroup
from kvsqueeze.cache.layer import SqueezeLayer
from kvsqueeze.methods import Method, get_method
from kvsqueeze.quantization.rope import KeyRotation, key_rotations
from kvsqueeze.text_config import head_dim_of, layer_types_of

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gemma3_text")
"""Model types (``config.model_type``) whose attention the cache and the attention hook support."""


def check_architecture(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder config of a supported model; a one-line ``ValueError`` for anything else."""
    text = config.get_text_config(decoder=True)
    if text.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {text.model_type!r} is not supported yet; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return text


class SqueezeCache(Cache):
    """A KV cache compressed by a kvsqueeze method, one :class:`SqueezeLayer` per model layer.

    Args:
        model: the model (switched to kvsqueeze attention if it is not already) or its config.
        method: a method name (see ``kvsqueeze methods``) or a built :class:`~kvsqueeze.methods.Method`.
        budget: ratio of the prompt in (0, 1] or absolute tokens per KV head per layer (on average).
        record_prefill: keep the prompt's queries so :meth:`fork` can compress copies of this cache
            (only meaningful with the ``full`` method).
        tokenizer: the model's tokenizer, for methods that replay the prompt (``kvzip``) and for forks
            of this cache to them.
        **params: hyperparameter overrides for a method given by name.
    """

    def __init__(
        self,
        model: PreTrainedModel | PreTrainedConfig,
        method: str | Method = "full",
        budget: float | int | str | Budget = 1.0,
        *,
        record_prefill: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **params: Any,
    ) -> None:
        config = model if isinstance(model, PreTrainedConfig) else model.config
        self.model = model if isinstance(model, PreTrainedModel) else None
        text = check_architecture(config)
        if self.model is not None:
            enable(self.model)
        self.method = get_method(method, **params).for_model(self.model)
        self.budget = Budget.parse(budget)
        self.config = text
        self.tokenizer = tokenizer
        self.prompt_ids: torch.Tensor | None = None  # (B, L) the prompt's token ids, for a replay
        self.prompt_mask: torch.Tensor | None = None  # (B, L) its padding mask
        self._replay_seconds = 0.0
        self._replayed = False  # the prompt was scored by its replay (and compressed)
        self._replays: dict[tuple, tuple[list[torch.Tensor], float]] = {}  # replay scores, for forks
        quantize = self.method.components().quantize
        n = text.num_hidden_layers
        rotations: list[KeyRotation | None] = [None] * n
        if quantize is not None:
            quantize.check(n, head_dim_of(text))
            if quantize.scheme.key_pre_rope:
                rotations = key_rotations(text)
        self._model_config = config
        layer_types = layer_types_of(text)
        layers = [
            SqueezeLayer(
                self.method.components(),  # one set per layer: scorers and actions may keep layer state
                self.budget,
                layer_idx=i,
                num_layers=n,
                sliding_window=text.sliding_window if layer_types[i] == "sliding_attention" else None,
                record_prefill=record_prefill,
                key_rotation=rotations[i],
            )
            for i in range(n)
        ]
        super().__init__(layers=layers)
        self.group = LayerGroup(layers)
        for layer in layers:
            layer.group = self.group
        # the method scores the prompt by replaying it after the prompt's forward pass (KVzip)
        scorer = layers[0].components.scorer
        self.replays = scorer is not None and scorer.replays
        if self.replays:
            self._check_replay(layer_types)

    # ------------------------------------------------------------ replay (KVzip)

    def _check_replay(self, layer_types: list[str]) -> None:
        name = self.method.name
        if self.model is None:
            raise ValueError(f"{name} replays the prompt through the model: build the cache with the model")
        if self.tokenizer is None:
            raise ValueError(
                f"{name} replays the prompt after a repeat instruction: pass tokenizer= to the cache"
            )
        if "sliding_attention" in layer_types:
            raise ValueError(
                f"{name} does not support sliding-window layers: a replay's queries cannot see the context"
            )

    def before_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Called before each forward pass (a model hook): keep the prompt's ids when a replay needs them."""
        if self.layers[0].is_initialized or not (self.replays or self.layers[0].record_prefill):
            return
        self.prompt_ids = input_ids
        if input_ids is not None:
            self.prompt_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)

    def after_forward(self, decoder: torch.nn.Module) -> None:
        """Called after each forward pass (a model hook): replay the prompt once it is in, then compress."""
        busy = self.group.replay_span is not None  # this is a forward pass of the replay itself
        if self.replays and not (self._replayed or busy) and self.layers[0].prompt_lengths is not None:
            self._compress_by_replay(decoder)

    def _compress_by_replay(self, decoder: torch.nn.Module, source: SqueezeCache | None = None) -> None:
        from kvsqueeze.cache.replay import replay_and_score

        key = self.method.components().scorer.key
        known = source._replays.get(key) if source is not None else None
        if known is None:
            known = replay_and_score(self, decoder, self.tokenizer)
            if source is not None:
                source._replays[key] = known
        scores, self._replay_seconds = known  # a reused replay still costs what it cost once
        self._replayed = True
        for layer, layer_scores in zip(self.layers, scores, strict=True):
            layer.compress_scored(layer_scores.clone())

    def fork(
        self,
        method: str | Method = "full",
        budget: float | int | str | Budget = 1.0,
        *,
        reuse_attention: bool = False,
        **params: Any,
    ) -> SqueezeCache:
        """A new cache holding this cache's prompt compressed by ``method`` at ``budget``.

        This cache must be a ``full`` cache built with ``record_prefill=True`` and filled by one prompt
        forward. The result equals running ``method`` during that prefill (prefill once, compress many);
        this cache is left untouched. ``reuse_attention=True``: what scorers compute over the prompt (the
        column sums H2O, D2O and PrefixKV score by, ZipCache's saliency) is computed once over this cache's
        forks that ask for it and reused, which gives the same rows; their compression times are then not
        their own, so the benchmark leaves it off (the tuner turns it on).
        """
        if self.method.name != "full":
            raise ValueError(f"fork() needs a full cache as its source, not {self.method.name}")
        model = self.model if self.model is not None else self._model_config
        forked = SqueezeCache(model, method, budget, tokenizer=self.tokenizer, **params)
        forked.prompt_ids, forked.prompt_mask = self.prompt_ids, self.prompt_mask
        for source, layer in zip(self.layers, forked.layers, strict=True):
            layer.adopt_prefill(source, reuse_attention)
        if forked.replays:
            from kvsqueeze.attention.hooks import decoder_of

            forked._compress_by_replay(decoder_of(self.model), source=self)
        return forked

    def copy(self) -> SqueezeCache:
        """An independent deep copy of this cache in its current state (rows, lengths, method state).

        The model, its config, the tokenizer and the method object are shared, not copied. A server reuses
        a compressed context this way: compress a shared prefix once, then continue a copy per request.
        """
        shared = (self.model, self._model_config, self.tokenizer, self.method)
        memo = {id(obj): obj for obj in shared if obj is not None}
        return copy.deepcopy(self, memo)

    def replay_scores(self, method: str | Method = "kvzip", **params: Any) -> list[torch.Tensor]:
        """The replay scores of this recorded full cache's prompt rows, per layer (B, H_kv, T) fp32.

        ``method`` names a replaying method (``kvzip``) and its parameters; the replay runs on a copy, once
        per scorer setting (forks to that method reuse it), and this cache is left untouched.
        """
        built = get_method(method, **params)
        scorer = built.components().scorer
        if scorer is None or not scorer.replays:
            raise ValueError(f"{built.name} does not score by replaying the prompt")
        if scorer.key not in self._replays:
            self.fork(built, 1.0)
        return self._replays[scorer.key][0]

    # ------------------------------------------------------------------ measurement

    def nbytes(self) -> int:
        """Bytes the cache holds now, measured from its tensors (keys, values, positions, scorer state)."""
        return sum(layer.nbytes() for layer in self.layers)

    def kv_nbytes(self) -> int:
        """Bytes of the stored keys and values alone."""
        return sum(layer.kv_nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes a stock ``DynamicCache`` built from the model config would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            length = layer.seen if layer.sliding_window is None else min(layer.seen, layer.sliding_window)
            per_row = layer.head_dim * torch.empty((), dtype=layer.dtype).element_size()
            total += 2 * layer.batch_size * layer.num_kv_heads * length * per_row
        return total

    def stored_rows(self) -> torch.Tensor:
        """Rows kept per layer, sequence and KV head, (N_layers, B, H_kv)."""
        return torch.stack([layer.rows.lengths.view(layer.batch_size, -1) for layer in self.layers])

    def kept_ratio(self) -> torch.Tensor:
        """Share of the rows a full cache would hold that each sequence keeps, over all layers, (B,).

        The effective ratio of adaptive methods (``mass`` sizes itself); sliding-window layers count
        against the window they would hold anyway.
        """
        kept, full = 0, 0
        for layer in self.layers:
            seen = layer.tokens_seen()  # (B,)
            if layer.sliding_window is not None:
                seen = seen.clamp(max=layer.sliding_window)
            kept = kept + layer.rows.lengths.view(layer.batch_size, -1).sum(-1)
            full = full + seen * layer.num_kv_heads
        return kept / full

    def reset(self) -> None:
        """Empty every layer and forget the prompt statistics and layer state, for the next generation."""
        super().reset()
        self.group.reset()
        self.prompt_ids = self.prompt_mask = None
        self._replay_seconds = 0.0
        self._replayed = False
        self._replays.clear()
        for layer in self.layers:
            layer.components = self.method.components()

    def peak_nbytes(self) -> int:
        """The most bytes this cache held at any moment so far (after any append or compression)."""
        return self.group.peak_nbytes

    def compression_seconds(self) -> float:
        """Time spent scoring and selecting so far."""
        return self._replay_seconds + sum(layer.compression_seconds for layer in self.layers)

    def __repr__(self) -> str:
        return f"SqueezeCache(method={self.method.name}, budget={self.budget}, layers={len(self.layers)})"
