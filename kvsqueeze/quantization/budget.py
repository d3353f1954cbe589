"""KV quantization schemes and their measured storage per token (spec B §1, §4.2).

A :class:`KVQuantScheme` says how one head's keys and values are stored; :func:`quantize_kv` applies it to
a ``(*, T, D)`` block and :func:`bytes_per_token` measures the bytes the cache stores for one (codes and
parameters, from the stored tensors) per token and per (sequence, KV head). Figures for ``T = 4096``, float16
parameters, relative to the fp16 cache (``4 * D`` bytes per token for K and V)::

    scheme                                                D = 64              D = 128
    kivi-2   (2-bit, groups of 32)                     48.0 B  0.1875     96.0 B  0.1875
    zipcache-reference (K and V: 60% 4-bit, 40% 2-bit) 55.4 B  0.2164    106.8 B  0.2086
    zipcache (K 4-bit; V 25% 4-bit, 75% 2-bit)         56.2 B  0.2195    108.4 B  0.2117
    kivi-4   (4-bit, groups of 32)                     80.0 B  0.3125    160.0 B  0.3125
    kivi-8   (8-bit, groups of 32)                    144.0 B  0.5625    288.0 B  0.5625

KIVI's full-precision residual window is not counted; each ZipCache tier stores its key pair per channel
and the block's CST scale. With float32 parameters ZipCache would take 0.233x (reference) and 0.236x
(default, D = 64): its per-token value parameters dominate the overhead, hence float16 storage, as in the
reference implementations. The codes alone are 3.2 / 16 = 0.2x (reference) and 3.25 / 16 = 0.203x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.quantization.cst import cst_quantize
from kvsqueeze.quantization.hadamard import check_hadamard_dim
from kvsqueeze.quantization.mixed import MixedQuantized, quantize_mixed
from kvsqueeze.quantization.packing import check_bits, check_head_dim
from kvsqueeze.quantization.quantizer import PARAM_DTYPES, QuantizedTensor, quantize
from kvsqueeze.quantization.rope import KeyRotation

Quantized = QuantizedTensor | MixedQuantized


@dataclass(frozen=True)
class KVQuantScheme:
    """How one (sequence, KV head)'s keys and values are quantized.

    Keys are quantized per channel (``key_group_size`` consecutive tokens per group, ``None``: all tokens of
    the set), values per token (``value_group_size`` consecutive channels per group, ``None``: all
    channels), or by CST when ``value_cst``. With a low ratio above 0, the ``floor(ratio * T)`` tokens with
    the lowest scores are stored at ``low_bits`` and the others at ``bits`` (ZipCache). ``low_ratio`` is
    that ratio for keys and values; ``key_low_ratio`` or ``value_low_ratio`` replace it for one of them
    (ZipCache's code sets ``k_unimportant_ratio`` and ``v_unimportant_ratio`` apart). Both rank the tokens
    by the same scores, so the smaller low set lies inside the larger. The low set's keys get a parameter
    pair per ``low_key_group_size`` of its tokens (``None``: as ``key_group_size``). ``key_clip`` narrows
    each key group's range where that lowers its squared error. ``key_pre_rope`` quantizes keys in their
    frame before RoPE (:mod:`~kvsqueeze.quantization.rope`; the cache needs the model's rotation);
    ``value_hadamard`` quantizes values turned by a Hadamard matrix (:mod:`~kvsqueeze.quantization.hadamard`).
    ``key_bits`` and ``value_bits`` replace ``bits`` for the keys or the values alone (the high set's, when
    the scheme splits; ``None``: ``bits``): a per-layer bit profile sets them layer by layer
    (:meth:`~kvsqueeze.actions.quantize.Quantize.scheme_for`).
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
    key_low_ratio: float | None = None
    value_low_ratio: float | None = None
    key_pre_rope: bool = False
    value_hadamard: bool = False
    key_bits: int | None = None
    value_bits: int | None = None

    def __post_init__(self) -> None:
        for bits in (self.bits, self.key_bits, self.value_bits):
            if bits is not None:
                check_bits(bits)
        for label, group in (("key", self.key_group_size), ("low-set key", self.low_key_group_size)):
            if group is not None and group < 1:
                raise ValueError(f"{label} group size must be at least 1 token, got {group}")
        for label, ratio in (
            ("low_ratio", self.low_ratio),
            ("key_low_ratio", self.key_low_ratio),
            ("value_low_ratio", self.value_low_ratio),
        ):
            if ratio is not None and not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {ratio}")
        if self.splits:
            if self.low_bits is None:
                raise ValueError(
                    f"scheme {self.name!r} stores some tokens at low precision but has no low_bits"
                )
            check_bits(self.low_bits)
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"unsupported parameter dtype {self.param_dtype}; choose float16, bfloat16 or float32"
            )

    @property
    def high_key_bits(self) -> int:
        """Bits of the keys outside the low set (all keys when the scheme does not split)."""
        return self.bits if self.key_bits is None else self.key_bits

    @property
    def high_value_bits(self) -> int:
        """Bits of the values outside the low set (all values when the scheme does not split)."""
        return self.bits if self.value_bits is None else self.value_bits

    @property
    def key_ratio(self) -> float:
        """Fraction of a block's tokens whose keys are stored at ``low_bits``."""
        return self.low_ratio if self.key_low_ratio is None else self.key_low_ratio

    @property
    def value_ratio(self) -> float:
        """Fraction of a block's tokens whose values are stored at ``low_bits``."""
        return self.low_ratio if self.value_low_ratio is None else self.value_low_ratio

    @property
    def low_set_key_group(self) -> int | None:
        """Rows per key parameter pair in the low set: ``low_key_group_size``, else ``key_group_size``."""
        return self.key_group_size if self.low_key_group_size is None else self.low_key_group_size

    @property
    def splits(self) -> bool:
        """Whether tokens are split by score into a high-bit and a low-bit set (ZipCache)."""
        return self.key_ratio > 0 or self.value_ratio > 0

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a one-line ``ValueError`` if heads of ``head_dim`` channels cannot be stored this way."""
        for bits in (self.high_key_bits, self.high_value_bits, self.low_bits or self.bits):
            check_head_dim(head_dim, bits)
        group = self.value_group_size
        if group is not None and (group <= 0 or head_dim % group):
            raise ValueError(f"value group size {group} does not divide the head dimension {head_dim}")
        if self.value_hadamard:
            check_hadamard_dim(head_dim)


def kivi_scheme(bits: int = 2, group_size: int = 32, *, key_pre_rope: bool = False) -> KVQuantScheme:
    """KIVI (spec B §4.2): keys per channel over groups of tokens, values per token over groups of channels."""
    return KVQuantScheme(
        f"kivi-{bits}",
        bits,
        key_group_size=group_size,
        value_group_size=group_size,
        key_pre_rope=key_pre_rope,
    )


KIVI_2 = kivi_scheme(2)
KIVI_4 = kivi_scheme(4)
KIVI_8 = kivi_scheme(8)
# ZipCache (spec B §1e): 4/2 bits, keys per channel per set, values CST. The reference (the official demo)
# stores the keys and values of the least salient 40% at 2 bits; kvsqueeze's default spends the same bytes
# on the keys: every key at 4 bits, the values of the least salient 75% at 2 bits (methods/zipcache.py says
# why), and a key pair per 128 low-set tokens when keys are split.
ZIPCACHE = KVQuantScheme(
    "zipcache", 4, low_bits=2, key_low_ratio=0.0, value_low_ratio=0.75, value_cst=True, low_key_group_size=128
)
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
    ranking per leading index, shared by keys and values); it is required when ``scheme.splits``.
    Key groups must divide their set here (the cache also stores a last, partial group). Rotated
    schemes (``key_pre_rope``, ``value_hadamard``) are the cache's: rotate the block first
    (:meth:`~kvsqueeze.quantization.rope.KeyRotation.rotate`,
    :func:`~kvsqueeze.quantization.hadamard.rotate_values`) and quantize it without the flags.
    """
    if scheme.key_pre_rope or scheme.value_hadamard:
        raise ValueError(
            f"quantize_kv does not rotate ({scheme.name!r} has key_pre_rope or value_hadamard); "
            "rotate the block first and quantize it without those flags"
        )
    dtype = scheme.param_dtype
    clip = scheme.key_clip
    if not scheme.splits:
        key_bits, value_bits = scheme.high_key_bits, scheme.high_value_bits
        k = quantize(keys, key_bits, "channel", scheme.key_group_size, param_dtype=dtype, clip=clip)
        if scheme.value_cst:
            v = cst_quantize(values, value_bits, scheme.value_group_size, param_dtype=dtype)
        else:
            v = quantize(values, value_bits, "token", scheme.value_group_size, param_dtype=dtype)
        return k, v
    if scores is None:
        raise ValueError(f"scheme {scheme.name!r} splits tokens by score; pass scores of shape (*, T)")
    if scores.shape != keys.shape[:-1]:
        raise ValueError(f"scores must have shape {tuple(keys.shape[:-1])}, got {tuple(scores.shape)}")
    tokens = scores.shape[-1]
    k = quantize_mixed(
        keys,
        lowest_mask(scores, int(scheme.key_ratio * tokens)),  # (*, T)
        scheme.high_key_bits,
        scheme.low_bits,
        "channel",
        scheme.key_group_size,
        low_group_size=scheme.low_set_key_group,
        param_dtype=dtype,
        clip=clip,
    )
    v = quantize_mixed(
        values,
        lowest_mask(scores, int(scheme.value_ratio * tokens)),
        scheme.high_value_bits,
        scheme.low_bits,
        "token",
        scheme.value_group_size,
        cst=scheme.value_cst,
        param_dtype=dtype,
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
    """Measured bytes per token of one KV head under ``scheme``, keys and values together:
    :func:`stored_bytes` / ``tokens``."""
    return stored_bytes(scheme, tokens, head_dim, seed=seed) / tokens


def stored_bytes(
    scheme: KVQuantScheme,
    tokens: int = 4096,
    head_dim: int = 64,
    *,
    seed: int = 0,
    names: tuple[str, ...] = ("keys", "values"),
) -> int:
    """Bytes one KV head stores for a random ``(tokens, head_dim)`` block quantized with ``scheme``.

    ``names``: the keys and values together (codes and parameters included), or ``("keys",)`` or
    ``("values",)`` alone. Measured from the tensors the cache stores when it quantizes the block
    (:class:`~kvsqueeze.cache.tiered.TieredRows`, random saliency).
    """
    from kvsqueeze.cache.packed import PackedRows  # the cache builds on this module
    from kvsqueeze.cache.tiered import TieredRows

    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 1, tokens, head_dim, generator=gen, dtype=torch.float16)  # (1, T, D) each
    rows = PackedRows(1)
    rows.append({"keys": keys, "values": values, "positions": torch.arange(tokens, dtype=torch.int32)[None]})
    # a rotation costs no bytes; any frequencies measure the same
    rotation = KeyRotation.from_theta(10_000.0, head_dim) if scheme.key_pre_rope else None
    tiered = TieredRows(rows, scheme, torch.float16, rotation)
    tiered.quantize(rows.valid_mask(), torch.rand(1, tokens, generator=gen))
    return tiered.nbytes(names)
