"""KV quantization schemes and their measured storage per token (spec B §1, §4.2).

A :class:`KVQuantScheme` says how one head's keys and values are stored; :func:`quantize_kv` applies it to
a ``(*, T, D)`` block and :func:`bytes_per_token` measures the bytes the cache stores for one (codes and
parameters, from the stored tensors) per token and per (sequence, KV head). Figures for ``T = 4096``, float16
parameters, relative to the fp16 cache (``4 * D`` bytes per token for K and V)::

    scheme                                                D = 64              D = 128
    kivi-2   (2-bit, groups of 32)                     48.0 B  0.1875     96.0 B  0.1875
    zipcache-reference (60% 4-bit, 40% 2-bit, CST)     55.4 B  0.2164    106.8 B  0.2086
    zipcache (+ a key pair per 128 low-set tokens)     56.1 B  0.2193    108.3 B  0.2115
    kivi-4   (4-bit, groups of 32)                     80.0 B  0.3125    160.0 B  0.3125
    kivi-8   (8-bit, groups of 32)                    144.0 B  0.5625    288.0 B  0.5625

KIVI's full-precision residual window is not counted; each ZipCache tier stores the block's CST scale.
With float32 parameters ZipCache's split would take 0.233x (reference) and 0.239x (D = 64): its per-token
value parameters dominate the overhead, hence float16 storage, as in the reference implementations. The
split's codes alone are 3.2 / 16 = 0.2x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.quantization.cst import cst_quantize
from kvsqueeze.quantization.mixed import MixedQuantized, quantize_mixed
from kvsqueeze.quantization.packing import check_bits, check_head_dim
from kvsqueeze.quantization.quantizer import PARAM_DTYPES, QuantizedTensor, quantize

Quantized = QuantizedTensor | MixedQuantized


@dataclass(frozen=True)
class KVQuantScheme:
    """How one (sequence, KV head)'s keys and values are quantized.

    Keys are quantized per channel (``key_group_size`` consecutive tokens per group, ``None``: all tokens of
    the set), values per token (``value_group_size`` consecutive channels per group, ``None``: all
    channels), or by CST when ``value_cst``. With ``low_ratio > 0``, the ``floor(low_ratio * T)`` tokens with
    the lowest scores are stored at ``low_bits`` and the others at ``bits`` (ZipCache); the low set's keys
    then get a parameter pair per ``low_key_group_size`` of its tokens (``None``: as ``key_group_size``).
    ``key_clip`` narrows each key group's range where that lowers its squared error.
    """

    name: str
    bits: int
    low_bits: int | None = None
    low_ratio: float = 0.0
    key_group_size: int | None = None
    value_group_size: int | None = None
    value_cst: bool = False
    param_dtype: torch.dtype = torch.float16
    low_key_group_size: int | None = None
    key_clip: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        for label, group in (("key", self.key_group_size), ("low-set key", self.low_key_group_size)):
            if group is not None and group < 1:
                raise ValueError(f"{label} group size must be at least 1 token, got {group}")
        if not 0.0 <= self.low_ratio <= 1.0:
            raise ValueError(f"low_ratio must lie in [0, 1], got {self.low_ratio}")
        if self.low_ratio > 0:
            if self.low_bits is None:
                raise ValueError(f"scheme {self.name!r} has low_ratio {self.low_ratio} but no low_bits")
            check_bits(self.low_bits)
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"unsupported parameter dtype {self.param_dtype}; choose float16, bfloat16 or float32"
            )

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a one-line ``ValueError`` if heads of ``head_dim`` channels cannot be stored this way."""
        for bits in (self.bits, self.low_bits or self.bits):
            check_head_dim(head_dim, bits)
        group = self.value_group_size
        if group is not None and (group <= 0 or head_dim % group):
            raise ValueError(f"value group size {group} does not divide the head dimension {head_dim}")


def kivi_scheme(bits: int = 2, group_size: int = 32) -> KVQuantScheme:
    """KIVI (spec B §4.2): keys per channel over groups of tokens, values per token over groups of channels."""
    return KVQuantScheme(f"kivi-{bits}", bits, key_group_size=group_size, value_group_size=group_size)


KIVI_2 = kivi_scheme(2)
KIVI_4 = kivi_scheme(4)
KIVI_8 = kivi_scheme(8)
# ZipCache (spec B §1e): 4/2 bits, r_lo = 0.4, keys per channel per set, values CST. kvsqueeze's default
# also gives the 2-bit set's keys a parameter pair per 128 of its tokens (methods/zipcache.py says why);
# ZIPCACHE_REFERENCE is the reference's scheme.
ZIPCACHE = KVQuantScheme("zipcache", 4, low_bits=2, low_ratio=0.4, value_cst=True, low_key_group_size=128)
ZIPCACHE_REFERENCE = KVQuantScheme("zipcache-reference", 4, low_bits=2, low_ratio=0.4, value_cst=True)


def quantize_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    scheme: KVQuantScheme,
    scores: torch.Tensor | None = None,
) -> tuple[Quantized, Quantized]:
    """Quantize a block of keys and values ``(*, T, D)`` with ``scheme``: the dense reference of what the
    cache stores (:class:`~kvsqueeze.cache.tiered.TieredRows`), for whole blocks.

    ``scores`` ``(*, T)`` rank the tokens for a mixed-precision scheme (the lowest go to the low set, one
    selection per leading index, shared by keys and values); it is required when ``scheme.low_ratio > 0``.
    Key groups must divide their set here (the cache also stores a last, partial group).
    """
    dtype = scheme.param_dtype
    clip = scheme.key_clip
    if scheme.low_ratio == 0:
        k = quantize(keys, scheme.bits, "channel", scheme.key_group_size, param_dtype=dtype, clip=clip)
        if scheme.value_cst:
            v = cst_quantize(values, scheme.bits, scheme.value_group_size, param_dtype=dtype)
        else:
            v = quantize(values, scheme.bits, "token", scheme.value_group_size, param_dtype=dtype)
        return k, v
    if scores is None:
        raise ValueError(f"scheme {scheme.name!r} splits tokens by score; pass scores of shape (*, T)")
    if scores.shape != keys.shape[:-1]:
        raise ValueError(f"scores must have shape {tuple(keys.shape[:-1])}, got {tuple(scores.shape)}")
    low = lowest_mask(scores, int(scheme.low_ratio * scores.shape[-1]))  # (*, T)
    bits = (scheme.bits, scheme.low_bits)
    k = quantize_mixed(
        keys,
        low,
        *bits,
        "channel",
        scheme.key_group_size,
        low_group_size=scheme.low_key_group_size,
        param_dtype=dtype,
        clip=clip,
    )
    v = quantize_mixed(
        values, low, *bits, "token", scheme.value_group_size, cst=scheme.value_cst, param_dtype=dtype
    )
    return k, v


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """``(*, T)`` bool marking the ``count`` lowest scores of each leading index."""
    low = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        low.scatter_(-1, scores.topk(count, dim=-1, largest=False).indices, True)
    return low


def fp16_bytes_per_token(head_dim: int) -> int:
    """Bytes of one token's key and value in fp16, per KV head: ``2 * 2 * D``."""
    return 4 * head_dim


def bytes_per_token(scheme: KVQuantScheme, tokens: int = 4096, head_dim: int = 64, *, seed: int = 0) -> float:
    """Measured bytes per token of one KV head under ``scheme``, on a random ``(tokens, head_dim)`` block.

    Keys and values together, codes and parameters included, measured from the tensors the cache stores
    when it quantizes the block (:class:`~kvsqueeze.cache.tiered.TieredRows`, random saliency).
    """
    from kvsqueeze.cache.packed import PackedRows  # the cache builds on this module
    from kvsqueeze.cache.tiered import TieredRows

    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 1, tokens, head_dim, generator=gen, dtype=torch.float16)  # (1, T, D) each
    rows = PackedRows(1)
    rows.append({"keys": keys, "values": values, "positions": torch.arange(tokens, dtype=torch.int32)[None]})
    tiered = TieredRows(rows, scheme, torch.float16)
    tiered.quantize(rows.valid_mask(), torch.rand(1, tokens, generator=gen))
    return tiered.nbytes(("keys", "values")) / tokens
