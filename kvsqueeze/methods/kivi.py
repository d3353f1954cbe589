"""KIVI (Liu et al., ICML'24, arXiv 2402.02750): tuning-free asymmetric 2-bit KV quantization.

Every token is kept. Keys are quantized per channel over groups of ``group_size`` consecutive tokens,
values per token over groups of ``group_size`` channels, all at ``bits`` bits with float16 parameters.
The most recent tokens stay in a full-precision residual: after the prompt the last ``n mod residual``,
and during decode new tokens wait there until ``residual`` of them are quantized as one block.

Defaults (paper): 2 bits, ``group_size = 32``, ``residual = 128`` (the repo's GSM8K example uses 32).
One simplification: values leave the residual with their keys, in blocks, where KIVI's values slide out
one token at a time (the same bits per token; at most ``residual - 1`` values differ in when they are
quantized). Compose with eviction as ``EVICTION+kivi`` (``h2o+kivi``). ``key_pre_rope = True`` quantizes
the keys before RoPE, as ZipCache can (:mod:`~kvsqueeze.quantization.rope`; off by default, as in KIVI).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.actions.quantize import Quantize
from kvsqueeze.methods.base import Components, Method, Schedule, register
from kvsqueeze.quantization.budget import kivi_scheme
from kvsqueeze.quantization.packing import check_bits


@register
@dataclass
class KIVI(Method):
    """Keys per channel, values per token, at ``bits`` bits; recent tokens in full precision."""

    name = "kivi"
    summary = "2-bit keys per channel and values per token, full-precision residual (keeps every token)"
    uses_budget = False
    bits: int = 2
    group_size: int = 32
    residual: int = 128
    key_pre_rope: bool = False

    def validate(self) -> None:
        super().validate()
        check_bits(self.bits)
        if self.group_size < 1 or self.residual < 1 or self.residual % self.group_size:
            raise ValueError(
                f"kivi: residual ({self.residual}) must be a positive multiple of group_size ({self.group_size})"
            )

    def components(self) -> Components:
        scheme = kivi_scheme(self.bits, self.group_size, key_pre_rope=self.key_pre_rope)
        quantize = Quantize(scheme, block=self.residual, keep_remainder=True)
        return Components(scorer=None, allocator=None, schedule=Schedule.NEVER, quantize=quantize)
