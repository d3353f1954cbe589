"""The model-side work of KV reuse: prefills at explicit positions, a segment's base KV, cache assembly.

Everything here is one sequence (batch 1). Keys of a segment are handled stacked over layers,
``(L, H_kv, T, D)``; a transformers ``DynamicCache`` is what the policies build and hand back.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from kvsqueeze.quantization.rope import KeyRotation, key_rotations
from kvsqueeze.reuse.rope_shift import rotate_keys
from kvsqueeze.reuse.segments import Piece
from kvsqueeze.reuse.store import SegmentKV, SegmentStore, token_key

REUSE_ARCHITECTURES = ("llama", "qwen2", "mistral")
"""Model types KV reuse supports (full attention in every layer, one RoPE, rotate-half pairs)."""


class Engine:
    """A model with its RoPE rotations, a segment store and the header segments are computed after.

    Args:
        model: a supported causal LM (see ``REUSE_ARCHITECTURES``).
        store: where base KVs live.
        header: token ids (H,) every stored segment is computed after, then dropped (its attention sink).
    """

    def __init__(self, model: PreTrainedModel, store: SegmentStore, header: torch.Tensor) -> None:
        text = model.config.get_text_config(decoder=True)
        if text.model_type not in REUSE_ARCHITECTURES:
            raise ValueError(
                f"KV reuse supports {', '.join(REUSE_ARCHITECTURES)}; {text.model_type!r} is not supported yet"
            )
        self.model = model
        self.config = text
        self.store = store
        self.header = header.to(torch.long)
        self.rotations: list[KeyRotation] = key_rotations(text)
        self.num_layers = text.num_hidden_layers
        self.max_positions = getattr(text, "max_position_embeddings", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ prefill

    def empty_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int, cache: DynamicCache) -> torch.Tensor:
        """Run ``ids`` (T,) at positions ``start + arange(T)`` on top of ``cache`` (extended in place);
        returns the last position's logits (V,)."""
        positions = torch.arange(start, start + ids.numel(), device=self.model.device)[None]
        out = self.model(
            input_ids=ids[None].to(self.model.device), position_ids=positions, cache=cache, use_cache=True
        )
        return out.logits[0, -1]

    def forward_pieces(self, pieces: list[Piece], cache: DynamicCache) -> int:
        """Run contiguous ``pieces`` in one forward at their own positions on top of ``cache`` (extended in
        place); returns how many tokens ran."""
        if not pieces:
            return 0
        self.forward(torch.cat([p.ids for p in pieces]), pieces[0].start, cache)
        return pieces[-1].end - pieces[0].start

    def prefill(self, ids: torch.Tensor) -> DynamicCache:
        """A fresh cache holding ``ids`` (T,) at positions 0..T-1 (the full-recompute reference)."""
        cache = self.empty_cache()
        if ids.numel():
            self.forward(ids, 0, cache)
        return cache

    # ------------------------------------------------------------------ stacked KV

    def rows(self, cache: DynamicCache, start: int, end: int) -> SegmentKV:
        """Rows ``start:end`` of ``cache`` with keys turned back to pre-RoPE, fp32, stacked over layers."""
        keys = torch.stack([layer.keys[0, :, start:end] for layer in cache.layers])  # (L, H_kv, T, D)
        values = torch.stack([layer.values[0, :, start:end] for layer in cache.layers]).float()
        positions = torch.arange(start, end)
        return SegmentKV(rotate_keys(keys, positions, self.rotations, inverse=True), values)

    def placed(self, kv: SegmentKV, start: int) -> SegmentKV:
        """``kv`` (pre-RoPE keys) placed at positions ``start + arange(T)``: post-RoPE keys, model dtype."""
        positions = torch.arange(start, start + kv.num_tokens)
        keys = rotate_keys(kv.keys, positions, self.rotations).to(self.dtype)  # (L, H_kv, T, D)
        return SegmentKV(keys, kv.values.to(self.dtype))

    def append(self, cache: DynamicCache, kv: SegmentKV, start: int) -> None:
        """Append ``kv`` (pre-RoPE keys) to ``cache`` placed at positions ``start + arange(T)``."""
        placed = self.placed(kv, start)
        for i in range(self.num_layers):
            cache.update(placed.keys[i][None], placed.values[i][None], i)

    # ------------------------------------------------------------------ base KV

    def base_kv(self, ids: torch.Tensor) -> tuple[SegmentKV, bool]:
        """The base KV of a segment ``ids`` (T,): computed after the header alone, the header dropped,
        keys pre-RoPE. Read from the store when there; else computed and stored. Returns (kv, computed)."""
        key = token_key(ids, self.header)
        kv = self.store.get(key)
        if kv is not None:
            return kv, False
        h = self.header.numel()
        cache = self.prefill(torch.cat([self.header, ids.to(torch.long)]))
        kv = self.rows(cache, h, h + ids.numel())
        self.store.put(key, ids, kv)
        return kv, True
