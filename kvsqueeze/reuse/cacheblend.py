"""CacheBlend (Yao et al., EuroSys 2025, arXiv 2405.16444; spec B §3.2).

Reuse each shared segment's stored KV after the RoPE fix, then recompute a few "high KV deviation" tokens
layer by layer: layer 0 runs on every token (its KV equals the stored one, but the hidden states are
needed); at the check layer (1) fresh values are computed for every token and a reused token's deviation
is ``sum_{h,d} (V_fresh - V_cached)^2``; the top ``ratio`` of the reused tokens by deviation, plus every
non-shared token (the prompt's own text and the query suffix), are the only tokens whose hidden states go
on through the later layers. Their fresh K/V overwrite the cached rows, and their queries attend over all
rows with a causal mask built from their true positions (the reference's bottom-right triangle is
approximate). Defaults from the official code (YaoJiayi/CacheBlend): ``ratio=0.16``, check layer 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsqueeze.reuse.base import Built, ReusePolicy
from kvsqueeze.reuse.engine import Engine
from kvsqueeze.reuse.segments import Piece


@dataclass(frozen=True)
class CacheBlendConfig:
    """CacheBlend's parameters.

    Args:
        ratio: share of the reused tokens recomputed (the code's ``recomp_ratio`` 0.16; "about 15%" in the
            paper).
        check_layer: the layer where deviations are measured (the code's ``check_layers = [1]``).
    """

    ratio: float = 0.16
    check_layer: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"cacheblend ratio must be in [0, 1], got {self.ratio}")
        if self.check_layer < 1:
            raise ValueError(f"cacheblend check_layer must be >= 1, got {self.check_layer}")


class _BlendRows:
    """The cache a decoder layer sees during blending: ``update`` writes the fresh rows of the selected
    tokens into the layer's full K/V and hands back every row."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values  # per layer (1, H_kv, N, D), post-RoPE
        self.selected = torch.zeros(0, dtype=torch.long)  # (S,) positions being recomputed

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx][:, :, self.selected] = key.to(self.keys[layer_idx].dtype)
        self.values[layer_idx][:, :, self.selected] = value.to(self.values[layer_idx].dtype)
        return self.keys[layer_idx], self.values[layer_idx]


class CacheBlend(ReusePolicy):
    """Stored segments, RoPE-shifted, with the most deviating tokens recomputed (see the module doc)."""

    name = "cacheblend"

    def __init__(self, config: CacheBlendConfig | None = None, **params: float) -> None:
        self.config = config or CacheBlendConfig(**params)

    @torch.inference_mode()
    def build(self, engine: Engine, pieces: list[Piece], agent: str) -> Built:
        n = pieces[-1].end if pieces else 0
        if n == 0:
            return Built(engine.empty_cache(), 0, 0)
        if self.config.check_layer >= engine.num_layers:
            raise ValueError(
                f"cacheblend check_layer {self.config.check_layer} >= {engine.num_layers} layers"
            )
        model = engine.model
        decoder = model.model
        dtype = engine.dtype
        heads, dim = engine.config.num_key_value_heads, engine.rotations[0].head_dim
        keys = [torch.zeros(1, heads, n, dim, dtype=dtype) for _ in range(engine.num_layers)]
        values = [torch.zeros(1, heads, n, dim, dtype=dtype) for _ in range(engine.num_layers)]
        reused = torch.zeros(n, dtype=torch.bool)  # tokens whose KV comes from the store
        for piece in pieces:
            if not piece.shared:
                continue
            kv, _ = engine.base_kv(piece.ids)
            placed = engine.placed(kv, piece.start)  # (L, H_kv, T, D) post-RoPE keys, values
            for i in range(engine.num_layers):
                keys[i][0, :, piece.start : piece.end] = placed.keys[i]
                values[i][0, :, piece.start : piece.end] = placed.values[i]
            reused[piece.start : piece.end] = True

        ids = torch.cat([p.ids for p in pieces]).to(torch.long)
        positions = torch.arange(n)
        hidden = decoder.embed_tokens(ids[None])  # (1, N, hidden)
        rows = _BlendRows(keys, values)
        selected = positions  # layer 0 (and every layer before the check) runs on every token
        kept_reused = int(reused.sum())
        for i, layer in enumerate(decoder.layers[: engine.num_layers]):
            if i == self.config.check_layer:
                selected = self._select(layer, hidden, values[i], reused)
                hidden = hidden[:, _index_in(selected, rows.selected)]
                kept_reused = int(reused.sum()) - int(reused[selected].sum())
            rows.selected = selected
            cos_sin = decoder.rotary_emb(hidden, position_ids=selected[None])
            mask = (positions[None, :] <= selected[:, None])[None, None]  # (1, 1, S, N) True = attend
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=selected[None],
                cache=rows,
                use_cache=True,
                position_embeddings=cos_sin,
            )
        cache = engine.empty_cache()
        for i in range(engine.num_layers):
            cache.update(keys[i], values[i], i)
        details = {"selected": int(selected.numel()), "layer0_tokens": n}
        return Built(cache, kept_reused, n - kept_reused, details=details)

    def _select(
        self, layer: torch.nn.Module, hidden: torch.Tensor, cached_values: torch.Tensor, reused: torch.Tensor
    ) -> torch.Tensor:
        """Positions recomputed from this layer on: every non-reused token plus the top ``ratio`` of the
        reused ones by value deviation."""
        attn = layer.self_attn
        fresh = attn.v_proj(layer.input_layernorm(hidden))  # (1, N, H_kv * D)
        n = hidden.shape[1]
        fresh = fresh.view(1, n, -1, attn.head_dim).transpose(1, 2)  # (1, H_kv, N, D)
        deviation = (fresh.float() - cached_values.float()).pow(2).sum(dim=(0, 1, 3))  # (N,)
        reused_positions = reused.nonzero().squeeze(-1)
        k = math.floor(self.config.ratio * reused_positions.numel())
        top = reused_positions[deviation[reused_positions].topk(k).indices] if k else reused_positions[:0]
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[top] = True
        chosen |= ~reused
        return chosen.nonzero().squeeze(-1)


def _index_in(subset: torch.Tensor, superset: torch.Tensor) -> torch.Tensor:
    """Indices into ``superset`` (sorted positions) of the positions in ``subset``."""
    return torch.searchsorted(superset, subset)
