"""Low-bit KV quantization primitives for ZipCache and KIVI (spec B §0, §1, §4.2).

Plain PyTorch on ``(*, T, D)`` blocks (leading dims, tokens, head channels), no transformers import
(except :func:`key_rotations` for RoPE types other than default):

* :func:`quantize`: asymmetric 2/4/8-bit quantization, per channel (keys) or per token (values);
* :func:`cst_quantize`: ZipCache's channel-separable token-wise quantization of values;
* :func:`quantize_mixed`: a high-bit and a low-bit token set, each with its own parameters;
* :func:`pack_codes` / :func:`unpack_codes`: 4, 2 or 1 codes per byte along the head dimension;
* :class:`KVQuantScheme`, :func:`quantize_kv`, :func:`bytes_per_token`: whole schemes and their bytes;
* :class:`KeyRotation`, :func:`key_rotations`: a model's RoPE, to quantize keys before it (KVQuant);
  :func:`rotate_values`: a Hadamard turn of values before their per-token quantization (QuaRot).

How the results map onto :class:`~kvsqueeze.cache.packed.PackedRows` (rows along dim 0): the packed codes
``(N, D * bits / 8)`` and per-token value parameters ``(N, D / G)`` are per-row fields; per-channel key
parameters belong to a block of tokens (``(D,)`` per set or per ``G`` tokens) and CST's ``c`` ``(D,)`` to
a segment, so they live beside the rows, not in them.
"""

from kvsqueeze.quantization.budget import (
    KIVI_2,
    KIVI_4,
    KIVI_8,
    ZIPCACHE,
    ZIPCACHE_REFERENCE,
    KVQuantScheme,
    bytes_per_token,
    fp16_bytes_per_token,
    kivi_scheme,
    lowest_mask,
    quantize_kv,
    stored_bytes,
)
from kvsqueeze.quantization.cst import channel_scale, cst_quantize
from kvsqueeze.quantization.hadamard import hadamard, rotate_values
from kvsqueeze.quantization.mixed import MixedQuantized, quantize_mixed, split_tokens
from kvsqueeze.quantization.packing import SUPPORTED_BITS, codes_per_byte, pack_codes, unpack_codes
from kvsqueeze.quantization.quantizer import QuantizedTensor, quantize
from kvsqueeze.quantization.rope import KeyRotation, key_rotations

__all__ = [
    "KIVI_2",
    "KIVI_4",
    "KIVI_8",
    "SUPPORTED_BITS",
    "ZIPCACHE",
    "ZIPCACHE_REFERENCE",
    "KVQuantScheme",
    "KeyRotation",
    "MixedQuantized",
    "QuantizedTensor",
    "bytes_per_token",
    "channel_scale",
    "codes_per_byte",
    "cst_quantize",
    "fp16_bytes_per_token",
    "hadamard",
    "key_rotations",
    "kivi_scheme",
    "lowest_mask",
    "pack_codes",
    "quantize",
    "quantize_kv",
    "quantize_mixed",
    "rotate_values",
    "split_tokens",
    "stored_bytes",
    "unpack_codes",
]
