"""ZipCache (He et al., NeurIPS'24, arXiv 2405.14256): saliency-based mixed-precision KV quantization.

Every token is kept; its key and its value are each stored at 4 or 2 bits. Saliency is the normalized
attention of probe queries (the last 5% of the prompt plus 5% random earlier positions, see
:class:`~kvsqueeze.scorers.normalized_attention.NormalizedAttentionScorer`); per (sequence, KV head) the keys
of the ``floor(key_low_ratio * n)`` least salient tokens and the values of the ``floor(value_low_ratio * n)``
least salient go to ``low_bits``, the others to ``bits`` (the official code's ``k_unimportant_ratio`` and
``v_unimportant_ratio``). Keys are quantized per channel over the tokens of their precision set, values by
channel-separable token-wise quantization (CST), with float16 parameters. During decode, new tokens wait in
a full-precision buffer; every ``streaming_gap`` tokens the buffer is quantized as a new block, split by
the current query's attention. Compose with eviction as ``EVICTION+zipcache`` (``cake+zipcache``).

Defaults: 4/2 bits, probes 5% + 5%, ``streaming_gap = 100`` as in the official demo; the split differs.
The demo stores the keys and values of the least salient 40% at 2 bits (``key_low_ratio = value_low_ratio
= 0.4``). kvsqueeze's default keeps every key at 4 bits and stores the values of the least salient 75% at
2 bits (``key_low_ratio = 0``, ``value_low_ratio = 0.75``): the same bytes (56.2 B per token and KV head at
D = 64, 0.2195x fp16, under ZipCache's 0.22x), spent where the error is. On Qwen2.5-0.5B at 4k, 2-bit keys
carry nearly all of the loss: on a needle task, quantizing only the values moves the next-token
distribution by KL < 0.001, only the keys by 0.21. Post-RoPE key channels drift with position, so one range
over a 1600-token low set is wide, and 4 levels across it lose the needle; counting tasks (common words)
need every token's key, so no saliency split of the keys protects them. The 4k benchmark
(``scripts/bench_report.py``, docs/RESULTS.md) runs the default beside the demo split, and at 3 samples per
task beside ZipCache at 4 bits throughout: that control loses as much to the full cache as the default, so
what is left comes from the 4-bit per-channel keys, not from the 2-bit values. It also runs the default
query-aware, the papers' setting, where the probes see the question: 5 points under the full cache there
(7 query-agnostic), the misses being copied digit strings (a UUID, a 7-digit number) and word counts.
At the same bytes, ``key_group=128, key_pre_rope=True, value_low_ratio=0.875`` (keys grouped as KIVI
groups them, paid for with values) is 1 point under the full cache there, at a lower KL, but 8 points under
it query-agnostic (the default 7, standard errors about 5), and it decodes slower (2.8 tokens/s against
3.4 in that run), so it is an option, not the default. KIVI at 4 bits (0.36x fp16) is 1.5 points under the
full cache query-agnostic (standard error 1.0): on this model, parity takes more bytes than ZipCache's 0.22x.

``low_key_group`` (default 128) gives the low set's keys a per-channel (min, step) pair per 128 of its
tokens instead of one over the whole set, as KIVI groups keys; it matters only when keys are split.
``key_group`` does the same for the high set (default ``None``: one pair over the set, as the reference).

Two options quantize in a rotated frame, at no extra bytes. ``key_pre_rope = True`` quantizes the keys as
they were before RoPE (KVQuant, Hooper et al. 2024; :mod:`~kvsqueeze.quantization.rope`): the cache turns
each key back by its position before quantizing it and forward again after dequantizing. After RoPE a
channel's steady offset (Qwen2's key bias) turns with position and widens the channel's range; before RoPE
it does not. ``value_hadamard = True`` quantizes ``v @ H`` for an orthonormal Hadamard ``H`` (QuaRot,
Ashkboos et al. 2024; :mod:`~kvsqueeze.quantization.hadamard`), so no single channel sets a token's range.
Both are off by default, as in the reference; docs/RESULTS.md runs them together beside the default at 3
samples per task, and the quantization report gives their KL.

``key_clip = True`` narrows each key group's range where that lowers its squared error
(:func:`~kvsqueeze.quantization.quantizer.search_clip`, no extra bytes). The reference's scheme is
``zipcache(key_low_ratio=0.4, value_low_ratio=0.4, low_key_group=None)``. docs/RESULTS.md reports the
default, the demo split with and without the key groups, and clipping.
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
    """Salient tokens' keys and values at ``bits``, the rest at ``low_bits``; keys per channel, values CST."""

    name = "zipcache"
    summary = "mixed 4/2-bit quantization by normalized probe attention (keeps every token)"
    uses_budget = False
    bits: int = 4
    low_bits: int = 2
    key_low_ratio: float = 0.0
    value_low_ratio: float = 0.75
    recent_ratio: float = 0.05
    random_ratio: float = 0.05
    streaming_gap: int = 100
    seed: int = 0
    key_group: int | None = None
    low_key_group: int | None = 128
    key_clip: bool = False
    key_pre_rope: bool = False
    value_hadamard: bool = False

    def validate(self) -> None:
        super().validate()
        check_bits(self.bits)
        check_bits(self.low_bits)
        for label, ratio in (
            ("key_low_ratio", self.key_low_ratio),
            ("value_low_ratio", self.value_low_ratio),
        ):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"zipcache: {label} must lie in [0, 1], got {ratio}")
        for label, group in (("key_group", self.key_group), ("low_key_group", self.low_key_group)):
            if group is not None and group < 1:
                raise ValueError(f"zipcache: {label} must be at least 1 token, got {group}")
        if self.streaming_gap < 1:
            raise ValueError(f"zipcache: streaming_gap must be at least 1, got {self.streaming_gap}")

    def components(self) -> Components:
        scheme = KVQuantScheme(
            f"zipcache-{self.bits}/{self.low_bits}",
            self.bits,
            self.low_bits,
            key_group_size=self.key_group,
            value_cst=True,
            low_key_group_size=self.low_key_group,
            key_clip=self.key_clip,
            key_pre_rope=self.key_pre_rope,
            value_hadamard=self.value_hadamard,
            key_low_ratio=self.key_low_ratio,
            value_low_ratio=self.value_low_ratio,
        )
        saliency = NormalizedAttentionScorer(self.recent_ratio, self.random_ratio, self.seed)
        quantize = Quantize(scheme, block=self.streaming_gap, saliency=saliency)
        return Components(scorer=None, allocator=None, schedule=Schedule.NEVER, quantize=quantize)
