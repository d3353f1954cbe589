"""Quantize: store the rows a method keeps at low bit width instead of full precision (ZipCache, KIVI).

It runs after the method's eviction step, on whatever rows are left, so any eviction method composes with
it (``snapkv+zipcache``, ``h2o+kivi``): eviction chooses which rows stay, quantization chooses how many bits
each one keeps. The layer's storage becomes a :class:`~kvsqueeze.cache.tiered.TieredRows`: quantized tiers
plus a full-precision residual of the most recent rows.

When rows are quantized (spec B §1d, §4.2):

* after the prompt: every row, except, with ``keep_remainder``, the last ``n mod block`` rows of each
  segment (KIVI: the keys of an incomplete group wait in the residual);
* during decode: once a segment's residual holds ``block`` rows, those rows, as one new block with its own
  key parameters (ZipCache's ``N_s = 100``-token streaming buffer; KIVI's residual of ``R = 128``). Old rows
  are never re-quantized, so errors do not compound (ZipCache's reference re-quantizes everything).

With a split scheme (``scheme.splits``), ``saliency`` ranks the rows of a block: the keys of the least
salient ``floor(key_ratio * n)`` and the values of the least salient ``floor(value_ratio * n)`` are
stored at low bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.cache.packed import PackedRows
from kvsqueeze.quantization.budget import KVQuantScheme
from kvsqueeze.scorers.base import Scorer


@dataclass
class Quantize:
    """How and when a layer's kept rows are quantized."""

    scheme: KVQuantScheme
    block: int  # rows quantized together during decode (and the remainder unit with keep_remainder)
    keep_remainder: bool = False  # after the prompt, the last (n mod block) rows stay in full precision
    saliency: Scorer | None = None  # ranks rows for a split scheme

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"quantization block must be at least 1 row, got {self.block}")
        group = self.scheme.key_group_size
        # KIVI's residual holds whole key groups; otherwise a block's last group may be partial
        if self.keep_remainder and group is not None and self.block % group:
            raise ValueError(
                f"quantization block {self.block} must be a multiple of the key group size {group}"
            )
        if self.scheme.splits and self.saliency is None:
            raise ValueError(
                f"scheme {self.scheme.name!r} splits rows by saliency; give it a saliency scorer"
            )

    def due(self, residual: PackedRows, is_prefill: bool) -> torch.Tensor | None:
        """(S, T_res) bool: the residual rows to quantize now, or None when there are none."""
        lengths = residual.lengths  # (S,)
        slot = torch.arange(residual.max_length, device=lengths.device)
        if is_prefill:
            count = lengths - lengths % self.block if self.keep_remainder else lengths
        else:
            count = torch.where(lengths >= self.block, self.block, 0)
        if not bool((count > 0).any()):
            return None
        return slot[None, :] < count[:, None]

    def rank(self, obs: Observation) -> torch.Tensor:
        """(B, H_kv, T) saliency of the stored rows, higher = more bits."""
        return self.saliency.score(obs, None)
