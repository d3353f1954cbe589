"""KV reuse across contexts: a store of KV segments and the policies that place them in new prompts.

    from kvsqueeze.reuse import KVReuse, Segment
    reuse = KVReuse(model, tokenizer, policy="kvcomm")          # or "plain", "cacheblend", "full"
    prepared = reuse.prepare([Segment(role), Segment(document, shared=True), Segment(question)])
    out = model.generate(**prepared.generate_inputs(), max_new_tokens=32)
    print(prepared.reused_tokens, prepared.recomputed_tokens)

Spec B §3 (plain position-corrected reuse, CacheBlend, KVCOMM); see each policy's module for its paper.
"""

from kvsqueeze.reuse.api import POLICIES, KVReuse, get_policy
from kvsqueeze.reuse.base import Built, FullRecompute, ReusePolicy
from kvsqueeze.reuse.cacheblend import CacheBlend, CacheBlendConfig
from kvsqueeze.reuse.kvcomm import KVCOMM, KVCOMMConfig
from kvsqueeze.reuse.plain import PlainReuse
from kvsqueeze.reuse.rope_shift import rotate_keys, shift_keys
from kvsqueeze.reuse.segments import Piece, ReusedPrompt, Segment
from kvsqueeze.reuse.store import SegmentKV, SegmentStore, token_key

__all__ = [
    "KVCOMM",
    "POLICIES",
    "Built",
    "CacheBlend",
    "CacheBlendConfig",
    "FullRecompute",
    "KVCOMMConfig",
    "KVReuse",
    "Piece",
    "PlainReuse",
    "ReusePolicy",
    "ReusedPrompt",
    "Segment",
    "SegmentKV",
    "SegmentStore",
    "get_policy",
    "rotate_keys",
    "shift_keys",
    "token_key",
]
