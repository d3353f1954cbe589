"""KV reuse across contexts (kvsqueeze.reuse): RoPE shift, exactness of reuse, the store's bound, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvsqueeze
from kvsqueeze.models.tiny import tiny_model, tiny_tokenizer
from kvsqueeze.quantization.rope import key_rotations
from kvsqueeze.reuse import KVCOMM, KVReuse, Segment, SegmentKV, SegmentStore, shift_keys
from kvsqueeze.reuse.engine import Engine
from kvsqueeze.reuse.kvcomm import Anchor

REUSE_ARCHS = ("llama", "qwen2", "mistral")
DOC = "The access code of project Falcon is 4821. Rivers carry silt to the sea. " * 2


def _model(arch: str, **overrides):
    model = tiny_model(arch, num_hidden_layers=3, **overrides)
    kvsqueeze.enable(model)
    return model


def _keys(cache, layer: int) -> torch.Tensor:
    return cache.layers[layer].keys


@pytest.mark.parametrize("arch", REUSE_ARCHS)
def test_rope_shift_matches_recomputation(arch):
    """Keys computed at positions a.. and shifted to b.. equal keys computed at b.. (layer 0, where a key
    depends on its token and position only), to fp32 tolerance; a shift there and back is the identity."""
    model = _model(arch)
    tok = tiny_tokenizer()
    store = SegmentStore()
    engine = Engine(model, store, torch.zeros(0, dtype=torch.long))
    ids = torch.tensor(tok(DOC, add_special_tokens=False)["input_ids"])
    pad = torch.full((37,), 5, dtype=torch.long)
    near = engine.prefill(ids)  # the segment at 0..T-1
    far = engine.prefill(torch.cat([pad, ids]))  # the same tokens at 37..
    rotations = key_rotations(model.config)
    stacked = torch.stack([layer.keys[0] for layer in near.layers])  # (L, H_kv, T, D)
    moved = shift_keys(stacked, 0, 37, rotations)
    torch.testing.assert_close(moved[0], far.layers[0].keys[0, :, 37:].float(), atol=1e-5, rtol=1e-5)
    back = shift_keys(moved, 37, 0, rotations)
    torch.testing.assert_close(back, stacked.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["plain", "cacheblend"])
@pytest.mark.parametrize("arch", REUSE_ARCHS)
def test_reuse_after_identical_prefix_is_the_full_cache(arch, policy):
    """A segment stored after the prompt's own prefix and reused right after it (its offset in the stored
    run is 0) gives exactly the full cache in every layer, and the same greedy tokens."""
    model = _model(arch)
    tok = tiny_tokenizer()
    prefix, suffix = "System: you answer briefly.\n", "\nQuestion: what is the access code?"
    segments = [Segment(prefix), Segment(DOC, shared=True), Segment(suffix)]
    store = SegmentStore()
    full = KVReuse(model, tok, "full", store=store, header=prefix).prepare(segments)
    reused = KVReuse(model, tok, policy, store=store, header=prefix).prepare(segments)
    assert reused.reused_tokens > 0
    for layer in range(3):
        torch.testing.assert_close(_keys(reused.cache, layer), _keys(full.cache, layer), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            reused.cache.layers[layer].values, full.cache.layers[layer].values, atol=1e-5, rtol=1e-5
        )
    a = model.generate(**full.generate_inputs(), max_new_tokens=6, do_sample=False)
    b = model.generate(**reused.generate_inputs(), max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_plain_reuse_elsewhere_differs_only_past_layer_0():
    """Placed after a different prefix, a reused segment's layer-0 KV is still exact; deeper layers are not
    (what CacheBlend and KVCOMM repair)."""
    model = _model("llama")
    tok = tiny_tokenizer()
    segments = [Segment("Agent B speaks here.\n"), Segment(DOC, shared=True), Segment("\nQ: code?")]
    store = SegmentStore()
    full = KVReuse(model, tok, "full", store=store).prepare(segments)
    plain = KVReuse(model, tok, "plain", store=store).prepare(segments)
    torch.testing.assert_close(_keys(plain.cache, 0), _keys(full.cache, 0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_keys(plain.cache, 2), _keys(full.cache, 2), atol=1e-3)


def test_counts_and_kvsqueeze_generate_takes_the_cache():
    model = _model("qwen2")
    tok = tiny_tokenizer()
    segments = [Segment("Role: checker.\n"), Segment(DOC, shared=True), Segment("\nQ: code?")]
    reuse = KVReuse(model, tok, "plain")
    prepared = reuse.prepare(segments)
    n = prepared.num_tokens
    assert prepared.reused_tokens + prepared.recomputed_tokens == n
    assert prepared.reused_tokens == len(tok(DOC, add_special_tokens=False)["input_ids"])
    expected = model.generate(**reuse.prepare(segments).generate_inputs(), max_new_tokens=5, do_sample=False)
    result = kvsqueeze.generate(model, tok, prepared, max_new_tokens=5)
    assert torch.equal(result.token_ids, expected[:, n:])
    assert result.method == "reuse:plain"


def test_kvcomm_anchors_dense_then_reuse():
    """KVCOMM: an agent's first prompt and new content are prefilled densely (and become anchors); content
    that is an anchor with this agent's offsets is reused with only the last token recomputed, and then
    reproduces the dense prefill's cache."""
    model = _model("llama")
    tok = tiny_tokenizer()
    reuse = KVReuse(model, tok, "kvcomm")
    segments = [Segment("Agent A.\n"), Segment(DOC, shared=True), Segment("\nQ: code?")]
    first = reuse.prepare(segments)
    assert first.dense and first.reused_tokens == 0
    again = reuse.prepare(segments)
    assert not again.dense and again.recomputed_tokens == 1
    for layer in range(3):
        torch.testing.assert_close(_keys(again.cache, layer), _keys(first.cache, layer), atol=1e-4, rtol=1e-4)
    policy = reuse.policy
    assert policy.reuse_rate == 0.5 and len(policy.anchors("#0")) == 1
    other = reuse.prepare([Segment("Agent B, another role.\n"), Segment(DOC, shared=True), Segment("\nQ?")])
    assert other.dense  # a new agent needs its own offsets first


def test_kvcomm_recompute_tail_computes_after_the_last_long_segment():
    """recompute_tail=N: the prompt after its last shared segment of >= N tokens is computed on top of the
    assembled head (its shared pieces get no anchors); with the head's exact offsets, the whole cache is the
    dense prefill's. A prompt with no segment that long is a dense prefill."""
    model = _model("llama")
    tok = tiny_tokenizer()
    reuse = KVReuse(model, tok, "kvcomm", recompute_tail=8)
    assert reuse.policy.name == "kvcomm(recompute_tail=8)"
    segments = [
        Segment("Agent A.\n"),
        Segment(DOC, shared=True, slot="doc"),
        Segment("\nQ: "),
        Segment("code?", shared=True, slot="question"),
        Segment(" Reply."),
    ]
    first = reuse.prepare(segments)
    assert first.dense
    again = reuse.prepare(segments)
    tail = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("\nQ: ", "code?", " Reply."))
    assert not again.dense and again.recomputed_tokens == tail  # the last token is in the tail
    assert again.reused_tokens + again.recomputed_tokens == again.num_tokens
    for layer in range(3):
        torch.testing.assert_close(_keys(again.cache, layer), _keys(first.cache, layer), atol=1e-4, rtol=1e-4)
    assert set(reuse.policy.pools) == {"doc"}
    short = reuse.prepare([Segment("Agent A.\n"), Segment("tiny", shared=True), Segment(" Reply.")])
    assert short.dense and short.reused_tokens == 0
    _one_line_error(lambda: KVReuse(model, tok, "kvcomm", recompute_tail=-1))


def test_plain_recompute_tail_computes_after_the_last_long_segment():
    """plain(recompute_tail=N) reuses the document and computes what follows it, a shared question
    included, over it: with the document stored after the prompt's own prefix the cache is exactly the
    full one (reusing the question too is not). A prompt with no segment that long is a dense prefill."""
    model = _model("qwen2")
    tok = tiny_tokenizer()
    prefix = "Agent A.\n"
    segments = [
        Segment(prefix),
        Segment(DOC, shared=True),
        Segment("\nQ: "),
        Segment("what is the code?", shared=True),
        Segment(" Reply."),
    ]
    store = SegmentStore()
    full = KVReuse(model, tok, "full", store=store, header=prefix).prepare(segments)
    reuse = KVReuse(model, tok, "plain", store=store, header=prefix, recompute_tail=64)
    assert reuse.policy.name == "plain(recompute_tail=64)"
    tailed = reuse.prepare(segments)
    every = KVReuse(model, tok, "plain", store=store, header=prefix).prepare(segments)
    assert not tailed.dense
    assert tailed.reused_tokens == len(tok(DOC, add_special_tokens=False)["input_ids"])
    assert tailed.reused_tokens + tailed.recomputed_tokens == tailed.num_tokens
    assert every.reused_tokens > tailed.reused_tokens  # the question came from the store
    for layer in range(3):
        torch.testing.assert_close(_keys(tailed.cache, layer), _keys(full.cache, layer), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_keys(every.cache, 2), _keys(full.cache, 2), atol=1e-3)
    short = reuse.prepare([Segment(prefix), Segment("tiny", shared=True), Segment(" Reply.")])
    assert short.dense and short.reused_tokens == 0
    _one_line_error(lambda: KVReuse(model, tok, "plain", recompute_tail=-1))


def test_kvcomm_entropy_test_reuses_close_content():
    """With two anchors of the slot, content close to one of them (low entropy) is reused, not prefilled;
    content as far from both (high entropy) becomes a third anchor."""
    model = _model("llama")
    tok = tiny_tokenizer()
    reuse = KVReuse(model, tok, "kvcomm")
    docs = [
        DOC + " Extra one.",
        "Unrelated words: " + DOC.replace("4821", "7730") + " Extra two.",
        DOC + " Extra",  # the first anchor's opening: close to it, far from the second
    ]
    calls = [reuse.prepare([Segment("Agent A.\n"), Segment(d, shared=True), Segment("\nQ?")]) for d in docs]
    assert [c.dense for c in calls] == [True, True, False]
    assert calls[2].reused_tokens == calls[2].num_tokens - 1
    assert reuse.policy.anchors("#0")[0].activations == 1
    # the entropy test on plain tensors: equidistant anchors (1 bit > 0.3 * log2(2)) make a new anchor
    policy = KVCOMM()
    zeros = torch.zeros(2, 1, 4, 8)
    pool = [Anchor("a", SegmentKV(zeros, zeros + 1)), Anchor("b", SegmentKV(zeros, zeros - 1))]
    assert policy._is_new_anchor(pool, SegmentKV(zeros, zeros))
    assert not policy._is_new_anchor(pool, SegmentKV(zeros, zeros + 0.9))
    assert policy._is_new_anchor(pool[:1], SegmentKV(zeros, zeros + 1))  # one anchor: always new


@settings(max_examples=60, deadline=None)
@given(
    bound=st.integers(min_value=200, max_value=6000),
    ops=st.lists(st.tuples(st.integers(0, 11), st.integers(1, 40), st.booleans()), min_size=1, max_size=40),
    bits=st.sampled_from([None, 4, 8]),
)
def test_store_byte_bound_holds(bound, ops, bits):
    """After any sequence of puts and gets, the bytes held (measured from the stored tensors) stay within
    the bound, and the last segment put is there whenever it fits alone."""
    store = SegmentStore(bound, bits=bits)
    for name, tokens, read in ops:
        key = f"k{name}"
        if read:
            store.get(key)
            continue
        kv = SegmentKV(torch.randn(2, 1, tokens, 8), torch.randn(2, 1, tokens, 8))
        kept = store.put(key, torch.arange(tokens), kv)
        measured = sum(entry.nbytes() for entry in store._entries.values())
        assert store.nbytes() == measured <= bound
        assert kept == (key in store)
        if kept:
            assert store.get(key).num_tokens == tokens


def test_store_lru_order_and_quantized_bytes():
    kv = SegmentKV(torch.randn(2, 1, 10, 8), torch.randn(2, 1, 10, 8))
    size = SegmentStore(10**6)
    size.put("a", torch.arange(10), kv)
    one = size.nbytes()
    store = SegmentStore(2 * one)
    store.put("a", torch.arange(10), kv)
    store.put("b", torch.arange(10), kv)
    store.get("a")  # a is now the most recent
    store.put("c", torch.arange(10), kv)
    assert "a" in store and "c" in store and "b" not in store
    quantized = SegmentStore(10**6, bits=8)
    quantized.put("a", torch.arange(10), kv)
    assert quantized.nbytes() < one
    torch.testing.assert_close(quantized.get("a").values, kv.values, atol=0.05, rtol=0.05)


def _one_line_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_bad_input_one_line_errors():
    model = _model("llama", max_position_embeddings=64)
    tok = tiny_tokenizer()
    reuse = KVReuse(model, tok, "plain")
    assert "unknown segment id" in _one_line_error(
        lambda: reuse.prepare([Segment("Hi "), Segment(id="nope")])
    )
    long_doc = "x" * 80
    assert "longer than the model's context" in _one_line_error(
        lambda: reuse.prepare([Segment("Hi "), Segment(long_doc, shared=True)])
    )
    assert "longer than the model's context" in _one_line_error(lambda: reuse.add(long_doc))
    assert "unknown reuse policy" in _one_line_error(lambda: KVReuse(model, tok, "nope"))
    assert "needs text" in _one_line_error(lambda: reuse.prepare([Segment("")]))
    assert "no segments" in _one_line_error(lambda: reuse.prepare([]))
    _one_line_error(lambda: KVReuse(model, tok, "kvcomm", gamma=-1.0))
    _one_line_error(lambda: KVReuse(model, tok, "cacheblend", ratio=2.0))
    gemma = _model("gemma3_text")
    assert "not supported" in _one_line_error(lambda: KVReuse(gemma, tok, "plain"))


def test_segment_by_id():
    model = _model("mistral")
    tok = tiny_tokenizer()
    reuse = KVReuse(model, tok, "plain")
    reuse.add(DOC, id="doc")
    by_id = reuse.prepare([Segment("Role.\n"), Segment(id="doc"), Segment("\nQ?")])
    by_text = reuse.prepare([Segment("Role.\n"), Segment(DOC, shared=True), Segment("\nQ?")])
    assert torch.equal(by_id.input_ids, by_text.input_ids)
    assert by_id.reused_tokens == by_text.reused_tokens > 0
