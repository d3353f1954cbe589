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

``layer_bits`` gives each layer its own bit widths, ``(key_bits, value_bits)`` per layer (a searched bit
profile, ``kvsqueeze tune --bytes``): layer ``i`` stores its rows with :meth:`Quantize.scheme_for` ``(i)``,
the scheme with those bits for its keys and values (for a split scheme, its high set's; the low set keeps
``low_bits``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvsqueeze.attention.observation import Observation
from kvsqueeze.cache.packed import PackedRows
from kvsqueeze.quantization.budget import KVQuantScheme
from kvsqueeze.quantization.packing import check_bits
from kvsqueeze.scorers.base import Scorer


@dataclass
class Quantize:
    """How and when a layer's kept rows are quantized."""

    scheme: KVQuantScheme
    block: int  # rows quantized together during decode (and the remainder unit with keep_remainder)
    keep_remainder: bool = False  # after the prompt, the last (n mod block) rows stay in full precision
    saliency: Scorer | None = None  # ranks rows for a split scheme
    layer_bits: tuple[tuple[int, int], ...] | None = None  # per layer (key bits, value bits); None: scheme's

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"quantization block must be at least 1 row, got {self.block}")
        group = self.scheme.key_group_size
        # KIVI's residual holds whole key groups; otherwise a block's last group may be partial
        if self.keep_remainder and group is not None and self.block % group:
            raise ValueError(
                f"quantization block {self.block} must be a multiple of the key group size {group}"
            )
        for pair in self.layer_bits or ():
            for bits in pair:
                check_bits(bits)
        if self.scheme.splits and self.saliency is None:
            raise ValueError(
                f"scheme {self.scheme.name!r} splits rows by saliency; give it a saliency scorer"
            )

    def scheme_for(self, layer_idx: int) -> KVQuantScheme:
        """The scheme layer ``layer_idx`` stores its rows with: ``scheme``, with that layer's bits if set."""
        if self.layer_bits is None:
            return self.scheme
        key_bits, value_bits = self.layer_bits[layer_idx]
        return dataclasses.replace(self.scheme, key_bits=key_bits, value_bits=value_bits)

    def check(self, num_layers: int, head_dim: int) -> None:
        """A one-line ``ValueError`` unless every layer of a model with ``num_layers`` layers of heads of
        ``head_dim`` channels can be stored this way."""
        if self.layer_bits is not None and len(self.layer_bits) != num_layers:
            raise ValueError(f"the bit profile has {len(self.layer_bits)} layers, the model {num_layers}")
        for layer_idx in range(num_layers if self.layer_bits is not None else 1):
            self.scheme_for(layer_idx).check_head_dim(head_dim)

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
