"""Quantization in rotated frames: keys before RoPE (the rotation matches each model's RoPE and inverts
exactly) and values turned by a Hadamard matrix; the cache stores the turned rows and attends over the
model's."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import rotate_half

from kvsqueeze import SqueezeCache
from kvsqueeze.cache import PackedRows
from kvsqueeze.cache.tiered import TieredRows
from kvsqueeze.models.tiny import SUPPORTED_ARCHITECTURES, tiny_config, tiny_model
from kvsqueeze.quantization.budget import KVQuantScheme, bytes_per_token, quantize_kv
from kvsqueeze.quantization.hadamard import hadamard, rotate_values
from kvsqueeze.quantization.rope import KeyRotation, key_rotations
from kvsqueeze.text_config import layer_types_of

D = 16
PRE_ROPE = KVQuantScheme("zip-pre", 4, low_bits=2, low_ratio=0.4, value_cst=True, key_pre_rope=True)


def quantized_block(
    keys: torch.Tensor,  # (N, D) after RoPE, at positions 0..N-1
    values: torch.Tensor,  # (N, D)
    scheme: KVQuantScheme,
    saliency: torch.Tensor,  # (N,)
    key_rotation: KeyRotation | None = None,
) -> TieredRows:
    """One segment of rows, all quantized at once."""
    rows = PackedRows(1)
    rows.append({"keys": keys[None], "values": values[None], "positions": torch.arange(len(keys))[None]})
    tiered = TieredRows(rows, scheme, torch.float32, key_rotation)
    tiered.quantize(rows.valid_mask(), saliency[None])
    return tiered


def assert_within_half_step(tier, name: str, truth: torch.Tensor, rows=slice(None), rel=1e-4, atol=1e-5):
    """Every dequantized element of ``tier``'s ``rows`` is within half its step of ``truth`` (same rows)."""
    err = (tier.dequantize(name)[rows] - truth).abs()
    assert bool((err <= tier.element_steps(name)[rows] / 2 * (1 + rel) + atol).all())


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    rotary_dim=st.sampled_from([4, 8, 16]),
    start=st.integers(0, 100_000),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotation_inverts_and_keeps_norms(n, rotary_dim, start, seed):
    """Back and forth is the identity; each channel pair keeps its length; unrotated channels stay put."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, D, generator=gen) * 10
    positions = torch.randint(start, start + 5000, (n,), generator=gen)
    rot = KeyRotation.from_theta(10_000.0, D, rotary_dim)
    turned = rot.rotate(rows, positions, inverse=True)
    torch.testing.assert_close(rot.rotate(turned, positions), rows, atol=1e-4, rtol=1e-5)
    half = rotary_dim // 2
    pair_norm = lambda x: x[:, :half].square() + x[:, half:rotary_dim].square()  # noqa: E731
    torch.testing.assert_close(pair_norm(turned), pair_norm(rows), atol=1e-3, rtol=1e-5)
    assert torch.equal(turned[:, rotary_dim:], rows[:, rotary_dim:])


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_rotation_matches_the_models_rope(arch):
    """For every supported architecture (Gemma 3: both layer types), rotating by ``key_rotations`` equals
    applying the model's own rotary embedding (its cos/sin with any attention scaling divided out)."""
    model = tiny_model(arch, num_hidden_layers=2)
    rotary = model.model.rotary_emb
    text = model.config.get_text_config(decoder=True)
    layer_types = layer_types_of(text)
    x = torch.randn(30, text.head_dim)
    positions = torch.arange(1000, 1030)
    for layer_type, rot in zip(layer_types, key_rotations(text), strict=True):
        args = (layer_type,) if arch == "gemma3_text" else ()
        cos, sin = rotary(x, positions[None], *args)
        scale = cos[0].square() + sin[0].square()  # attention_scaling ** 2
        expected = (x * cos[0] + rotate_half(x) * sin[0]) / scale.sqrt()
        torch.testing.assert_close(rot.rotate(x, positions), expected, atol=1e-5, rtol=1e-5)


def test_partial_rotary_and_missing_rope():
    config = tiny_config("llama", partial_rotary_factor=0.5)
    assert key_rotations(config)[0].rotary_dim == config.head_dim // 2
    no_rope = SimpleNamespace(model_type="norope", head_dim=16, num_hidden_layers=1)
    with pytest.raises(ValueError, match="key_pre_rope needs a RoPE model; 'norope' has no rope_theta"):
        key_rotations(no_rope)
    with pytest.raises(ValueError, match="rotates 32 channels; a head has 16"):
        KeyRotation(torch.ones(16), 16)
    rows = PackedRows(1)
    rows.append({"keys": torch.zeros(1, 4, D), "values": torch.zeros(1, 4, D)})
    with pytest.raises(ValueError, match="quantizes keys before RoPE; pass the layer's key_rotation"):
        TieredRows(rows, PRE_ROPE, torch.float32)
    with pytest.raises(ValueError, match="quantize_kv does not rotate"):
        quantize_kv(torch.zeros(4, D), torch.zeros(4, D), PRE_ROPE, torch.rand(4))


def test_pre_rope_tiers_bound_the_unrotated_keys():
    """The tiers hold keys turned back before RoPE, within half a step of them; attention sees them turned
    forward again, as close to the cached keys as the unrotated ones are, pair by pair."""
    gen = torch.Generator().manual_seed(0)
    n = 300
    positions = torch.arange(n)
    rot = KeyRotation.from_theta(10_000.0, D)
    pre = torch.randn(n, D, generator=gen) + torch.linspace(-20, 20, D)  # steady per-channel offsets
    keys = rot.rotate(pre, positions)  # (N, D) as the cache receives them
    values, saliency = torch.randn(n, D, generator=gen), torch.rand(n, generator=gen)
    tiered = quantized_block(keys, values, PRE_ROPE, saliency, rot)
    for tier in tiered.tiers:
        assert_within_half_step(tier, "keys", pre[tier.rows.fields["positions"].long()])
    seen = tiered.padded("keys")[0]  # (N, D) temporal order, after RoPE
    half = D // 2
    pair_err = lambda a, b: (a - b)[:, :half].square() + (a - b)[:, half:].square()  # noqa: E731
    unrotated = rot.rotate(seen, positions, inverse=True)
    torch.testing.assert_close(pair_err(seen, keys), pair_err(unrotated, pre), atol=1e-3, rtol=1e-4)

    # the same keys quantized after RoPE: the offsets sweep every fast pair, so the error is far larger
    post = quantized_block(keys, values, dataclasses.replace(PRE_ROPE, key_pre_rope=False), saliency)
    post = post.padded("keys")[0]
    assert float((post - keys).square().mean()) > 4 * float((seen - keys).square().mean())


def test_rotations_cost_no_bytes():
    plain = dataclasses.replace(PRE_ROPE, key_pre_rope=False)
    turned = dataclasses.replace(PRE_ROPE, value_hadamard=True)
    assert bytes_per_token(PRE_ROPE, head_dim=64) == bytes_per_token(plain, head_dim=64)
    assert bytes_per_token(turned, head_dim=64) == bytes_per_token(plain, head_dim=64)


@pytest.mark.parametrize("head_dim", [1, 2, 16, 64, 256])
def test_hadamard_is_orthonormal_and_its_own_inverse(head_dim):
    h = hadamard(head_dim)
    torch.testing.assert_close(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(head_dim), atol=1e-5, rtol=0)
    rows = torch.randn(5, head_dim)
    torch.testing.assert_close(rotate_values(rotate_values(rows)), rows, atol=1e-5, rtol=1e-5)


def test_hadamard_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="value_hadamard needs a power-of-two head dimension, got 24"):
        dataclasses.replace(PRE_ROPE, value_hadamard=True).check_head_dim(24)
    with pytest.raises(ValueError, match="value_hadamard needs a power-of-two head dimension, got 24"):
        SqueezeCache(tiny_config("llama", head_dim=24), "zipcache", value_hadamard=True)


def test_hadamard_values_bound_the_turned_rows_and_spread_an_outlier_channel():
    """The tiers hold ``v @ H`` within half a step; attention gets ``dequantized @ H``. With one large
    channel, per-token 2-bit steps over the turned rows are finer, and the error smaller."""
    gen = torch.Generator().manual_seed(0)
    n = 200
    values = torch.randn(n, D, generator=gen)
    values[:, 3] *= 30  # an outlier channel sets every token's range
    keys, saliency = torch.randn(n, D, generator=gen), torch.rand(n, generator=gen)
    scheme = KVQuantScheme("v2", 4, low_bits=2, key_low_ratio=0.0, value_low_ratio=1.0, value_hadamard=True)
    turned = quantized_block(keys, values, scheme, saliency)
    (tier,) = [t for t in turned.tiers if t.rows.num_rows]
    assert_within_half_step(tier, "values", rotate_values(values)[tier.rows.fields["positions"].long()])
    plain = quantized_block(keys, values, dataclasses.replace(scheme, value_hadamard=False), saliency)
    plain = plain.padded("values")[0]
    seen = turned.padded("values")[0]
    assert float((seen - values).square().mean()) < 0.8 * float((plain - values).square().mean())


@pytest.mark.parametrize(
    ("arch", "method", "params"),
    [
        ("qwen2", "zipcache", {"streaming_gap": 8, "value_hadamard": True}),
        ("gemma3_text", "zipcache", {"streaming_gap": 8}),
        ("llama", "kivi", {"residual": 16, "group_size": 8}),
    ],
)
def test_rotated_cache_generates_close_to_the_full_cache(arch, method, params):
    """A whole model: a cache with pre-RoPE keys (and Hadamard values) decodes, and its prompt rows match
    the full cache's, turned the same way, within half a step."""
    model = tiny_model(arch, num_hidden_layers=2)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    full = SqueezeCache(model, "full")
    quant = SqueezeCache(model, method, key_pre_rope=True, **params)
    with torch.inference_mode():
        out_full = model.generate(ids, past_key_values=full, max_new_tokens=12, do_sample=False)
        out_quant = model.generate(ids, past_key_values=quant, max_new_tokens=12, do_sample=False)
    assert out_quant.shape == out_full.shape
    checked = 0
    for layer_full, layer_quant in zip(full.layers, quant.layers, strict=True):
        full_positions = layer_full.rows.padded("positions", fill=-1)
        truth = {name: layer_full.rows.padded(name) for name in ("keys", "values")}
        assert truth["keys"].shape == layer_quant.rows.padded("keys").shape
        rot = layer_quant.key_rotation
        assert rot is not None
        for tier in layer_quant.rows.tiers:
            if not tier.rows.fields:
                continue
            seg, _ = tier.rows.segment_of_row()
            pos = tier.rows.fields["positions"]
            match = full_positions[seg] == pos[:, None]  # (M, T): the full cache's slot of each row
            # generated tokens may differ between the two caches; a sliding layer keeps its window only
            compare = (pos < ids.shape[1]) & match.any(-1)
            slot = match.int().argmax(-1)
            turned = {
                "keys": rot.rotate(truth["keys"][seg, slot], pos, inverse=True),
                "values": truth["values"][seg, slot],
            }
            if params.get("value_hadamard"):
                turned["values"] = rotate_values(turned["values"])
            for name, rows in turned.items():
                assert_within_half_step(tier, name, rows[compare], compare, rel=1e-3, atol=1e-4)
            checked += int(compare.sum())
    assert checked > 0
