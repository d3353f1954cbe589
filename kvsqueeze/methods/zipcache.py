"""ZipCache (He et al., NeurIPS'24, arXiv 2405.14256): saliency-based mixed-precision KV quantization.

Every token is kept; each is stored at 4 or 2 bits. Saliency is the normalized attention of probe queries
(the last 5% of the prompt plus 5% random earlier positions, see
:class:`~kvsqueeze.scorers.normalized_attention.NormalizedAttentionScorer`); per (sequence, KV head) the
``floor(low_ratio * n)`` least salient tokens go to ``low_bits``, the others to ``bits``. Keys are quantized
per channel over the tokens of their precision set, values by channel-separable token-wise quantization
(CST), with float16 parameters. During decode, new tokens wait in a full-precision buffer; every
``streaming_gap`` tokens the buffer is quantized as a new block, split by the current query's attention.

Defaults (official demo): 4/2 bits, ``low_ratio = 0.4`` (60% salient), probes 5% + 5%,
``streaming_gap = 100``. Compose with eviction as ``EVICTION+zipcache`` (``cake+zipcache``).

One default differs from the reference, on the 2-bit keys, which carry nearly all of the error (on
Qwen2.5-0.5B, 4k needle task, quantizing only the values moves the next-token distribution by KL < 0.001,
only the keys by 0.21):
``low_key_group = 128`` gives the low set's keys a per-channel (min, step) pair per 128 of its tokens
instead of one over the whole set. Post-RoPE channels drift with position, so a whole-prompt range is wide;
KIVI groups keys the same way. It costs 0.8 B per token and KV head at D = 64: 56.1 B, 0.219x fp16, under
ZipCache's 0.22x. On the 4k benchmark it halves the mean KL to the full cache (0.353 to 0.165).

``key_clip = True`` also narrows each key group's range where that lowers its squared error
(:func:`~kvsqueeze.quantization.quantizer.search_clip`, no extra bytes); measured, it does not help here
(KL 0.177 with the groups), so it is off. ``zipcache(low_key_group=None)`` is the reference's scheme.
docs/RESULTS.md reports all four.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.actions.quantize import Quantize
from kvsqueeze.methods.base import Components, Method, Schedule, register
from kvsqueeze.quantization.budget import KVQuantScheme
from kvsqueeze.quantization.packing import check_bits
from kvsqueeze.scorers.normalized_attention import NormalizedAttentionScorer


@register
@dataclass
class ZipCache(Method):
    """Salient tokens at ``bits``, the rest at ``low_bits``; keys per channel, values CST."""

    name = "zipcache"
    summary = "mixed 4/2-bit quantization by normalized probe attention (keeps every token)"
    uses_budget = False
    bits: int = 4
    low_bits: int = 2
    low_ratio: float = 0.4
    recent_ratio: float = 0.05
    random_ratio: float = 0.05
    streaming_gap: int = 100
    seed: int = 0
    low_key_group: int | None = 128
    key_clip: bool = False

    def validate(self) -> None:
        super().validate()
        check_bits(self.bits)
        check_bits(self.low_bits)
        if not 0.0 <= self.low_ratio <= 1.0:
            raise ValueError(f"zipcache: low_ratio must lie in [0, 1], got {self.low_ratio}")
        if self.low_key_group is not None and self.low_key_group < 1:
            raise ValueError(f"zipcache: low_key_group must be at least 1 token, got {self.low_key_group}")
        if self.streaming_gap < 1:
            raise ValueError(f"zipcache: streaming_gap must be at least 1, got {self.streaming_gap}")

    def components(self) -> Components:
        scheme = KVQuantScheme(
            f"zipcache-{self.bits}/{self.low_bits}",
            self.bits,
            self.low_bits,
            self.low_ratio,
            value_cst=True,
            low_key_group_size=self.low_key_group,
            key_clip=self.key_clip,
        )
        saliency = NormalizedAttentionScorer(self.recent_ratio, self.random_ratio, self.seed)
        quantize = Quantize(scheme, block=self.streaming_gap, saliency=saliency)
        return Components(scorer=None, allocator=None, schedule=Schedule.NEVER, quantize=quantize)
