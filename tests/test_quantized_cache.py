"""Quantized storage (ZipCache, KIVI, and eviction + quantization): tiers, bytes, bounds, composition."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze import SqueezeCache
from kvsqueeze.cache import PackedRows
from kvsqueeze.cache.tiered import QuantizedTier, TieredRows
from kvsqueeze.methods import get_method
from kvsqueeze.models.tiny import tiny_model
from kvsqueeze.quantization import ZIPCACHE, ZIPCACHE_REFERENCE, fp16_bytes_per_token, kivi_scheme
from kvsqueeze.quantization.budget import KVQuantScheme

D = 8
QUANTIZED = ("zipcache", "kivi", "snapkv+zipcache", "h2o+kivi", "cake+zipcache", "adakv+kivi")
SMALL = {"kivi": {"residual": 16, "group_size": 8}, "zipcache": {"streaming_gap": 10}}


def small_params(name: str) -> dict:
    """Small residual/buffer sizes and observation windows for the tiny prompts of these tests."""
    params = {}
    for part in name.split("+"):
        params.update(SMALL.get(part, {}))
        if part in ("snapkv", "cake", "adakv", "pyramidkv"):
            params["window"] = 8
    return params


def random_rows(lengths: list[int], seed: int) -> PackedRows:
    gen = torch.Generator().manual_seed(seed)
    rows = PackedRows(len(lengths))
    width = max(lengths)
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    rows.append(
        {
            "keys": torch.randn(len(lengths), width, D, generator=gen) * 3,
            "values": torch.randn(len(lengths), width, D, generator=gen),
            "positions": torch.arange(width, dtype=torch.int32).expand(len(lengths), width).clone(),
            "score": torch.rand(len(lengths), width, generator=gen),
        },
        keep,
    )
    return rows


schemes = st.sampled_from(
    [
        KVQuantScheme("zip", 4, low_bits=2, low_ratio=0.4, value_cst=True),
        KVQuantScheme("zip8", 8, low_bits=4, low_ratio=0.5, value_cst=True),
        KVQuantScheme("zipg", 4, low_bits=2, low_ratio=0.4, value_cst=True, low_key_group_size=3),
        KVQuantScheme("zipv", 4, low_bits=2, value_cst=True, key_low_ratio=0.2, value_low_ratio=0.7),
        KVQuantScheme("zipk", 8, low_bits=2, key_low_ratio=0.6, value_low_ratio=0.3, low_key_group_size=2),
        KVQuantScheme("zipv0", 4, low_bits=2, value_cst=True, key_low_ratio=0.0, value_low_ratio=0.75),
        kivi_scheme(2, group_size=4),
        kivi_scheme(4, group_size=2),
        kivi_scheme(8, group_size=8),
    ]
)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    scheme=schemes,
    seed=st.integers(0, 2**31 - 1),
    rounds=st.integers(1, 3),
)
def test_tiered_rows_keep_order_fields_and_error_bound(lengths, scheme, seed, rounds):
    """Quantizing in several blocks, evicting and rescoring keeps every row, in temporal order, within bounds."""
    rows = random_rows(lengths, seed)
    original = {name: rows.padded(name).clone() for name in ("keys", "values", "positions", "score")}
    tiered = TieredRows(rows.clone(), scheme, torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(rounds):
        res = tiered.residual
        select = (torch.rand(res.num_segments, res.max_length, generator=gen) < 0.7) & res.valid_mask()
        # rows leave the residual oldest first, as the cache does
        select = torch.cumprod(select.int(), dim=1).bool()
        tiered.quantize(select, torch.rand(select.shape, generator=gen))
    # every row is still there, in temporal order, with its own position and score
    assert torch.equal(tiered.lengths, rows.lengths)
    valid = tiered.valid_mask()
    assert torch.equal(tiered.padded("positions")[valid], original["positions"][valid])
    assert torch.equal(tiered.padded("score")[valid], original["score"][valid])
    # each element is within half its quantization step (tiers) or exact (residual)
    for tier in tiered.tiers:
        if not tier.rows.fields:
            continue
        pos = tier.rows.fields["positions"].long()
        seg, _ = tier.rows.segment_of_row()
        for name in ("keys", "values"):
            truth = original[name][seg, pos]
            err = (tier.dequantize(name) - truth).abs()
            assert bool((err <= tier.element_steps(name) / 2 * (1 + 1e-4) + 1e-5).all())
    # evicting through the combined view matches evicting the plain rows
    mask = torch.rand(valid.shape, generator=gen) < 0.5
    tiered.keep(mask & valid)
    rows.keep(mask & valid)
    kept = rows.valid_mask()
    assert torch.equal(tiered.padded("positions")[tiered.valid_mask()], rows.padded("positions")[kept])
    new_score = torch.rand(tiered.valid_mask().shape, generator=gen)
    tiered.update_field("score", new_score)
    assert torch.equal(tiered.padded("score")[tiered.valid_mask()], new_score[tiered.valid_mask()])


def test_zipcache_split_stores_under_022_of_fp16():
    """ZipCache's default 4/2-bit scheme, measured from the stored tensors at D = 64: <= 0.22 x fp16."""
    gen = torch.Generator().manual_seed(0)
    tokens, head_dim, segments = 4096, 64, 2
    rows = PackedRows(segments)
    rows.append(
        {
            "keys": torch.randn(segments, tokens, head_dim, generator=gen),
            "values": torch.randn(segments, tokens, head_dim, generator=gen),
            "positions": torch.arange(tokens, dtype=torch.int32).expand(segments, tokens).clone(),
        }
    )
    tiered = TieredRows(rows, ZIPCACHE, torch.float16)
    tiered.quantize(rows.valid_mask(), torch.rand(segments, tokens, generator=gen))
    per_token = tiered.nbytes(("keys", "values")) / (segments * tokens)
    assert per_token <= 0.22 * fp16_bytes_per_token(head_dim), per_token
    assert [tier.rows.num_rows for tier in tiered.tiers] == [  # every key at 4 bits; 75% of values at 2
        2 * (tokens - int(0.75 * tokens)),
        2 * int(0.75 * tokens),
    ]
    assert [(tier.key_bits, tier.value_bits) for tier in tiered.tiers] == [(4, 4), (4, 2)]


def test_tier_rows_split_by_saliency():
    """The least salient floor(r_lo * n) rows of each segment go to the low-bit tier."""
    rows = random_rows([10, 10], seed=3)
    tiered = TieredRows(rows, ZIPCACHE_REFERENCE, torch.float32)
    saliency = torch.arange(10, dtype=torch.float32).expand(2, 10)
    tiered.quantize(rows.valid_mask().clone(), saliency)
    assert sorted(tiered.tiers[1].rows.fields["positions"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("key_ratio", "value_ratio", "kinds"),
    [
        (0.4, 0.4, [(False, False), (True, True)]),
        (0.0, 0.75, [(False, False), (False, True)]),
        (0.2, 0.6, [(False, False), (False, True), (True, True)]),
        (0.5, 0.1, [(False, False), (True, False), (True, True)]),
    ],
)
def test_keys_and_values_split_by_their_own_ratios(key_ratio, value_ratio, kinds):
    """The keys of the floor(key_ratio * n) least salient rows and the values of the floor(value_ratio * n)
    least salient are stored at low bits; one tier per (key bits, value bits) pair that can occur."""
    scheme = KVQuantScheme("kv", 4, low_bits=2, key_low_ratio=key_ratio, value_low_ratio=value_ratio)
    rows = random_rows([10, 10], seed=4)
    tiered = TieredRows(rows, scheme, torch.float32)
    assert tiered.kinds == kinds
    saliency = torch.arange(10, dtype=torch.float32).expand(2, 10)  # position p is the p-th least salient
    tiered.quantize(rows.valid_mask().clone(), saliency)
    key_low, value_low = int(key_ratio * 10), int(value_ratio * 10)
    for tier, (key_at_low, value_at_low) in zip(tiered.tiers, kinds, strict=True):
        assert (tier.key_bits, tier.value_bits) == (2 if key_at_low else 4, 2 if value_at_low else 4)
        for position in tier.rows.fields["positions"].tolist():
            assert (position < key_low, position < value_low) == (key_at_low, value_at_low)
    assert sum(tier.rows.num_rows for tier in tiered.tiers) == 20


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", num_hidden_layers=3, head_dim=32, seed=0)


def prefill(model, name: str, budget: float = 1.0, **params) -> SqueezeCache:
    ids, mask = left_padded_batch([70, 50], seed=5)
    cache = SqueezeCache(model, name, budget, **params)
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=cache)
    return cache


@pytest.mark.parametrize("rotated", [False, True])
def test_eight_bit_zipcache_attends_like_the_full_cache(model, rotated):
    """With one 8-bit tier the quantized cache's next-token logits stay close to the full cache's, also
    when keys are quantized before RoPE (turned by each row's own position in a left-padded batch) and
    values after a Hadamard turn."""
    ids, mask = left_padded_batch([70, 50], seed=5)
    logits = {}
    eight_bits = {"bits": 8, "key_low_ratio": 0.0, "value_low_ratio": 0.0, "streaming_gap": 4}
    if rotated:
        eight_bits.update(key_pre_rope=True, value_hadamard=True)
    for name, params in (("full", {}), ("zipcache", eight_bits)):
        cache = SqueezeCache(model, name, **params)
        steps = []
        with torch.inference_mode():
            model(ids, attention_mask=mask, cache=cache)
            mask_t = mask
            for token in range(3, 13):  # ten decode steps: two streaming blocks are quantized
                mask_t = torch.cat([mask_t, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                out = model(torch.full((2, 1), token), attention_mask=mask_t, cache=cache)
                steps.append(out.logits[:, -1])
        logits[name] = torch.stack(steps)
    assert (logits["zipcache"] - logits["full"]).abs().max() < 0.05 * logits["full"].abs().max()


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_methods_generate_and_store_fewer_bytes(model, name):
    params = small_params(name)
    budget = 0.5 if "+" in name else 1.0
    ids, mask = left_padded_batch([70, 50], seed=5)
    cache = SqueezeCache(model, name, budget, **params)
    out = model.generate(
        ids, attention_mask=mask, cache=cache, max_new_tokens=24, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, ids.shape[1] + 24)
    assert cache.get_seq_length() == ids.shape[1] + 23
    # quantized rows take well under half their full-precision bytes, even with KIVI's full-precision residual
    # of 16 rows out of ~35 per head and tiny heads' relatively large parameters (0.22 at D = 64: see above)
    evicted_only = SqueezeCache(
        model,
        name.split("+")[0] if "+" in name else "full",
        budget,
        **{k: v for k, v in params.items() if k == "window"},
    )
    model.generate(
        ids, attention_mask=mask, cache=evicted_only, max_new_tokens=24, do_sample=False, pad_token_id=0
    )
    assert cache.kv_nbytes() < 0.6 * evicted_only.kv_nbytes(), cache.kv_nbytes() / evicted_only.kv_nbytes()


def test_zipcache_with_three_tiers_and_high_set_key_groups_generates(model):
    """Keys and values split apart (three tiers) and key groups in the high set, prompt and decode blocks."""
    ids, mask = left_padded_batch([70, 50], seed=5)
    params = {"key_low_ratio": 0.3, "value_low_ratio": 0.6, "key_group": 16, "streaming_gap": 10}
    cache = SqueezeCache(model, "zipcache", **params)
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for layer in cache.layers:
        tiers = layer.rows.tiers
        assert [(t.key_bits, t.value_bits, t.key_group_size) for t in tiers] == [
            (4, 4, 16),
            (4, 2, 16),
            (2, 2, 128),
        ]
        assert all(t.rows.num_rows > 0 for t in tiers)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "cake"])
def test_quantization_keeps_the_rows_eviction_chose(model, name):
    """At prefill, eviction scores full-precision rows, then quantizes what is left: same positions."""
    params = {"window": 8}
    plain = prefill(model, name, 0.4, **params)
    quantized = prefill(model, f"{name}+zipcache", 0.4, **params)
    assert [layer.kept_positions() for layer in quantized.layers] == [
        layer.kept_positions() for layer in plain.layers
    ]


@pytest.mark.parametrize("name", ["zipcache", "kivi", "snapkv+zipcache", "h2o+kivi"])
def test_fork_of_a_recorded_prefill_equals_a_live_quantized_run(model, name):
    params = small_params(name)
    ids, mask = left_padded_batch([70, 50], seed=5)
    source = SqueezeCache(model, "full", record_prefill=True)
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=source)
    forked = source.fork(name, 0.5, **params)
    live = prefill(model, name, 0.5, **params)
    for a, b in zip(forked.layers, live.layers, strict=True):
        assert a.kept_positions() == b.kept_positions()
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert forked.kv_nbytes() == live.kv_nbytes()


def test_beam_reordering_selects_quantized_rows(model):
    cache = prefill(model, "zipcache")
    before = [layer.kept_positions() for layer in cache.layers]
    keys = cache.layers[0].keys.clone()
    cache.reorder_cache(torch.tensor([1, 1]))
    assert [layer.kept_positions() for layer in cache.layers] == [[b[1], b[1]] for b in before]
    assert torch.equal(cache.layers[0].keys[0], keys[1, :, :50])  # sequence 1 holds 50 rows


def test_no_full_precision_copy_stays_between_calls(model):
    cache = prefill(model, "zipcache")
    layer = cache.layers[0]
    assert layer.rows._dense == {} and layer.rows.residual.num_rows == 0
    assert all(
        field.dtype == torch.uint8
        for tier in layer.rows.tiers
        for name, field in tier.rows.fields.items()
        if name.endswith("codes")
    )


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("zipcache", {"bits": 3}, "unsupported bit width 3"),
        ("zipcache", {"key_low_ratio": 1.5}, r"key_low_ratio must lie in \[0, 1\]"),
        ("zipcache", {"value_low_ratio": -0.1}, r"value_low_ratio must lie in \[0, 1\]"),
        ("kivi", {"bits": 1}, "unsupported bit width 1"),
        ("kivi", {"residual": 100, "group_size": 32}, "multiple of group_size"),
        ("d2o+zipcache", {}, "does not compose with quantization"),
        ("zipcache+kivi", {}, "already quantizes"),
        ("h2o+snapkv", {}, "not a quantization method"),
        ("h2o+kivi+zipcache", {}, r"is EVICTION\+QUANTIZATION"),
        ("h2o+kivi", {"nope": 1}, "has no parameter nope"),
    ],
)
def test_bad_quantization_input_is_a_clear_error(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_method(name, **params)


def test_group_size_must_divide_the_head_dimension(model):
    with pytest.raises(ValueError, match="does not divide the head dimension 32"):
        SqueezeCache(model, "kivi", group_size=48, residual=96)


def test_composed_method_routes_parameters():
    method = get_method("snapkv+kivi", window=16, residual=64)
    assert method.name == "snapkv+kivi" and method.uses_budget
    assert method.params()["window"] == 16 and method.params()["residual"] == 64
    assert not get_method("zipcache").uses_budget
    assert QuantizedTier  # re-exported for tools that read tiers


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_float_unpacking_matches_integer_unpacking(bits):
    from kvsqueeze.quantization.packing import pack_codes, unpack_codes, unpack_codes_float

    codes = torch.randint(
        0, 2**bits, (5, 3, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits)
    )
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes_float(packed, bits), unpack_codes(packed, bits).float())


@pytest.mark.parametrize("name", ["cake", "h2o+kivi", "snapkv+zipcache", "full"])
def test_incremental_size_tracking_equals_the_layers_bytes(model, name):
    """Layers note their own size changes; the running total always equals the sum over layers."""
    ids, mask = left_padded_batch([70, 50], seed=5)
    cache = SqueezeCache(model, name, 0.4 if name != "full" else 1.0, **small_params(name))
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert cache.group.total_nbytes == cache.nbytes()
    assert cache.peak_nbytes() >= cache.nbytes()
