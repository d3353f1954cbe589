"""Quantization primitives (ZipCache / KIVI, spec B §0, §1b, §4.2) on random tensors: error bounds, exact
cases, bit packing, validation messages and measured bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.quantization import (
    KIVI_2,
    ZIPCACHE,
    ZIPCACHE_REFERENCE,
    KVQuantScheme,
    bytes_per_token,
    channel_scale,
    cst_quantize,
    fp16_bytes_per_token,
    kivi_scheme,
    pack_codes,
    quantize,
    quantize_kv,
    quantize_mixed,
    unpack_codes,
)
from kvsqueeze.quantization.rows import group_channel_params

BITS = (2, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PARAM_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
BAD_BITS = st.integers(-2, 16).filter(lambda b: b not in BITS)


@st.composite
def blocks(draw, axis: str | None = None):
    """A random (S, T, D) block and a valid quantization setup for it."""
    axis = axis or draw(st.sampled_from(("channel", "token")))
    bits = draw(st.sampled_from(BITS))
    head_dim = 4 * draw(st.integers(1, 6))
    if axis == "channel":
        group = draw(st.sampled_from((None, 1, 2, 4, 8)))
        tokens = draw(st.integers(1, 12)) if group is None else group * draw(st.integers(1, 4))
    else:
        group = draw(st.sampled_from([None, *(g for g in (1, 2, 4, 8) if head_dim % g == 0)]))
        tokens = draw(st.integers(1, 12))
    segments = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    param_dtype = draw(st.sampled_from(PARAM_DTYPES))
    scale = 10.0 ** draw(st.floats(-3, 2))
    offset = draw(st.floats(-50, 50)) * scale
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(segments, tokens, head_dim, generator=gen) * scale + offset  # (S, T, D)
    outlier = draw(st.integers(0, head_dim - 1))
    x[..., outlier] *= draw(st.sampled_from((1.0, 20.0)))  # an outlier channel, as in real keys
    # parameters stored in float16 can only describe blocks inside its range (outside it, quantize raises:
    # see the -1e6 case of test_other_errors_are_one_line)
    x = x.clamp(-6e4, 6e4) if torch.float16 in (param_dtype, dtype) else x
    return x.to(dtype), bits, axis, group, param_dtype


def assert_within_bound(x: torch.Tensor, q, levels: int) -> None:
    """|x - x_hat| <= s / 2 per element (fp32 reconstruction), plus fp32 rounding slack."""
    x32 = x.float()
    step = q.element_scale()  # (S, T, D)
    err = (q.dequantize(torch.float32) - x32).abs()
    slack = 1e-6 * (2 * x32.abs() + levels * step)
    assert bool((err <= step / 2 + slack).all()), float((err - step / 2).max())
    # In the block's own dtype, the final rounding to that dtype adds at most one of its ulps.
    err_out = (q.dequantize().float() - x32).abs()
    ulp = torch.finfo(x.dtype).eps * (x32.abs() + step)
    assert bool((err_out <= step / 2 + slack + ulp).all())


@settings(max_examples=150, deadline=None)
@given(block=blocks())
def test_round_trip_error_is_at_most_half_a_step(block):
    x, bits, axis, group, param_dtype = block
    q = quantize(x, bits, axis, group, param_dtype=param_dtype)
    assert q.dequantize().dtype == x.dtype and q.dequantize().shape == x.shape
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == q.mins.dtype == param_dtype
    assert_within_bound(x, q, 2**bits - 1)


@settings(max_examples=80, deadline=None)
@given(block=blocks(axis="token"))
def test_cst_round_trip_error_is_at_most_half_a_step_times_c(block):
    x, bits, _, group, param_dtype = block
    q = cst_quantize(x, bits, group, param_dtype=param_dtype)
    c = q.channel_scale
    peak = x.float().abs().amax(-2).sqrt()  # (S, D): c_j = sqrt(max_t |x_tj|)
    assert c.dtype == param_dtype and bool((c.float() >= peak).all())
    assert bool((c.float() <= peak * (1 + 2 * torch.finfo(param_dtype).eps) + 1e-6).all())
    assert_within_bound(x, q, 2**bits - 1)


def group_stats(x: torch.Tensor, axis: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference min and max of every group, by explicit slicing, broadcast to (S, T, D)."""
    lo, hi = torch.empty_like(x), torch.empty_like(x)
    tokens, head_dim = x.shape[-2:]
    for start in range(0, tokens if axis == "channel" else head_dim, group):
        if axis == "channel":
            part = x[:, start : start + group, :]  # (S, G, D): one group per channel
            lo[:, start : start + group, :] = part.amin(1, keepdim=True)
            hi[:, start : start + group, :] = part.amax(1, keepdim=True)
        else:
            part = x[:, :, start : start + group]  # (S, T, G): one group per token
            lo[:, :, start : start + group] = part.amin(2, keepdim=True)
            hi[:, :, start : start + group] = part.amax(2, keepdim=True)
    return lo, hi


@settings(max_examples=60, deadline=None)
@given(block=blocks())
def test_fp32_parameters_follow_the_spec_formula(block):
    x, bits, axis, group, _ = block
    x = x.float()
    q = quantize(x, bits, axis, group, param_dtype=torch.float32)
    size = group or (x.shape[-2] if axis == "channel" else x.shape[-1])
    lo, hi = group_stats(x, axis, size)
    expected = ((hi - lo) / (2**bits - 1)).clamp_min(1e-6)
    torch.testing.assert_close(q.element_scale(), expected, rtol=1e-6, atol=1e-12)


def constant_groups(axis: str, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """A (2, T, D) block whose every group is constant, with values representable in float16."""
    gen = torch.Generator().manual_seed(bits)
    if axis == "channel":
        values = torch.randn(2, 3, 8, generator=gen) * 7  # (S, T // G, D)
        x = values.repeat_interleave(group, dim=-2)  # (S, T, D)
    else:
        values = torch.randn(2, 5, 8 // group, generator=gen) * 7  # (S, T, D // G)
        x = values.repeat_interleave(group, dim=-1)  # (S, T, D)
    return x.half().to(dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis,group", [("channel", 4), ("channel", 1), ("token", 8), ("token", 2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32])
def test_constant_groups_are_exact(bits, axis, group, dtype, param_dtype):
    x = constant_groups(axis, bits, group, dtype)
    q = quantize(x, bits, axis, group, param_dtype=param_dtype)
    assert torch.equal(q.dequantize(), x)
    assert bool((unpack_codes(q.codes, bits) == 0).all())


def test_low_precision_inputs_use_fp32_arithmetic():
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)) * 3
    for dtype in (torch.float16, torch.bfloat16):
        for bits in BITS:
            low, ref = quantize(x.to(dtype), bits, "token"), quantize(x.to(dtype).float(), bits, "token")
            assert torch.equal(low.codes, ref.codes) and torch.equal(low.scales, ref.scales)
            assert torch.equal(low.dequantize(), ref.dequantize().to(dtype))


@settings(max_examples=100, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    lead=st.lists(st.integers(0, 3), max_size=3),
    width=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_identity(bits, lead, width, seed):
    gen = torch.Generator().manual_seed(seed)
    head_dim = width * (8 // bits)
    codes = torch.randint(0, 2**bits, (*lead, head_dim), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, head_dim * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    raw = torch.randint(0, 256, (*lead, width), generator=gen, dtype=torch.uint8)
    assert torch.equal(pack_codes(unpack_codes(raw, bits), bits), raw)  # every byte is a valid packing


def test_packing_layout_puts_the_first_code_in_the_low_bits():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(torch.tensor([5, 12, 15, 0]), 4).tolist() == [5 | 12 << 4, 15]
    assert pack_codes(torch.tensor([7, 255]), 8).tolist() == [7, 255]


def one_line_error(match: str):
    return pytest.raises(ValueError, match=match)


@settings(max_examples=20, deadline=None)
@given(bits=BAD_BITS)
def test_bad_bit_width_is_a_one_line_error(bits):
    message = f"^unsupported bit width {bits}; choose 2, 4 or 8$"
    x = torch.zeros(1, 4, 8)
    calls = (
        lambda: quantize(x, bits, "channel"),
        lambda: quantize(x, bits, "token"),
        lambda: cst_quantize(x, bits),
        lambda: pack_codes(torch.zeros(8, dtype=torch.uint8), bits),
        lambda: unpack_codes(torch.zeros(2, dtype=torch.uint8), bits),
        lambda: KVQuantScheme("bad", bits),
        lambda: KVQuantScheme("bad", 4, low_bits=bits, low_ratio=0.5),
    )
    for call in calls:
        with one_line_error(message):
            call()


@pytest.mark.parametrize("group,head_dim", [(48, 64), (3, 8), (0, 8), (-4, 8), (16, 8)])
def test_group_size_that_does_not_divide_the_head_dim(group, head_dim):
    x = torch.zeros(2, 4, head_dim)
    with one_line_error(f"^group size {group} does not divide the head dimension {head_dim}$"):
        quantize(x, 4, "token", group)
    with one_line_error(f"^group size {group} does not divide the head dimension {head_dim}$"):
        cst_quantize(x, 4, group)


def test_group_size_that_does_not_divide_the_tokens():
    with one_line_error("^group size 32 does not divide the 40 tokens of the block; quantize whole"):
        quantize(torch.zeros(1, 40, 8), 2, "channel", 32)


@pytest.mark.parametrize("bits,head_dim", [(2, 6), (2, 2), (4, 3), (4, 65)])
def test_head_dim_that_packing_cannot_fill(bits, head_dim):
    message = f"^head dimension {head_dim} is not a multiple of {8 // bits}, which {bits}-bit packing needs"
    with one_line_error(message):
        quantize(torch.zeros(1, 4, head_dim), bits, "channel")
    with one_line_error(message):
        pack_codes(torch.zeros(head_dim, dtype=torch.uint8), bits)
    quantize(torch.zeros(1, 4, head_dim), 8, "channel")  # 8 bits: one code per byte, any head dim


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quantize(torch.zeros(8), 4, "token"), "expected a .* block"),
        (lambda: quantize(torch.zeros(2, 8, dtype=torch.int32), 4, "token"), "floating-point"),
        (lambda: quantize(torch.zeros(2, 8), 4, "row"), "unknown quantization axis"),
        (lambda: quantize(torch.zeros(2, 8), 4, "token", param_dtype=torch.int8), "parameter dtype"),
        (lambda: quantize(torch.tensor([[1.0, float("nan"), 0, 0]]), 4, "token"), "inf/nan"),
        (lambda: quantize(torch.tensor([[-1e6, 1.0, 0, 0]]), 4, "token"), "inf/nan"),
        (lambda: cst_quantize(torch.zeros(2, 8), 4, scale=torch.ones(4)), "channel scale must"),
        (lambda: quantize_kv(torch.zeros(4, 8), torch.zeros(4, 8), ZIPCACHE), "pass scores"),
        (lambda: KVQuantScheme("z", 4, low_ratio=0.3), "no low_bits"),
        (lambda: KVQuantScheme("z", 4, low_bits=2, low_ratio=1.5), r"low_ratio must lie in \[0, 1\]"),
        (lambda: KVQuantScheme("z", 4, param_dtype=torch.int8), "unsupported parameter dtype"),
    ],
)
def test_other_errors_are_one_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_unequal_low_set_sizes_are_rejected():
    low = torch.tensor([[True, False, False, False], [True, True, False, False]])
    with one_line_error("same number of tokens in the low set, got between 1 and 2"):
        quantize_mixed(torch.zeros(2, 4, 8), low, 4, 2, "channel")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("param_dtype,param_bytes", [(torch.float16, 2), (torch.float32, 4)])
@pytest.mark.parametrize(
    "axis,group,cst",
    [
        ("channel", None, False),
        ("channel", 16, False),
        ("token", None, False),
        ("token", 32, False),
        ("token", None, True),
        ("token", 16, True),
    ],
)
def test_nbytes_matches_the_formula(bits, param_dtype, param_bytes, axis, group, cst):
    segments, tokens, head_dim = 3, 64, 128
    x = torch.randn(segments, tokens, head_dim, dtype=torch.float16)  # (S, T, D)
    if cst:
        q = cst_quantize(x, bits, group, param_dtype=param_dtype)
    else:
        q = quantize(x, bits, axis, group, param_dtype=param_dtype)
    codes = segments * tokens * head_dim * bits // 8
    if axis == "channel":
        params = 2 * segments * (tokens // (group or tokens)) * head_dim
    else:
        params = 2 * segments * tokens * (head_dim // (group or head_dim))
    params += segments * head_dim if cst else 0  # CST's c
    assert q.codes.shape == (segments, tokens, head_dim * bits // 8)
    assert q.nbytes() == codes + params * param_bytes


def test_mixed_sets_match_separate_quantization_and_share_c():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 20, 16, generator=gen)  # (S, T, D)
    scores = torch.rand(2, 20, generator=gen)
    k, v = quantize_kv(x, x * 0.5, ZIPCACHE_REFERENCE, scores)
    low_expected = scores.argsort(-1)[:, :8].sort(-1).values  # floor(0.4 * 20) lowest, temporal order
    assert torch.equal(k.lo_index, low_expected) and torch.equal(v.lo_index, low_expected)
    assert (k.hi.bits, k.lo.bits, k.hi.axis) == (4, 2, "channel")
    x_lo = x.gather(1, low_expected[..., None].expand(-1, -1, 16))  # (S, 8, D)
    assert torch.equal(
        k.dequantize()[torch.arange(2)[:, None], low_expected], quantize(x_lo, 2, "channel").dequantize()
    )
    c = channel_scale(x * 0.5)
    assert v.hi.channel_scale is v.lo.channel_scale and torch.equal(v.hi.channel_scale, c)
    assert v.nbytes() == v.hi.nbytes() + v.lo.nbytes() - c.numel() * c.element_size()
    for part, target in ((k, x), (v, x * 0.5)):  # every token within half a step of its own set
        step = torch.empty(2, 20, 16)  # (S, T, D)
        step.scatter_(1, part.hi_index[..., None].expand(-1, -1, 16), part.hi.element_scale())
        step.scatter_(1, part.lo_index[..., None].expand(-1, -1, 16), part.lo.element_scale())
        slack = 1e-6 * (2 * target.abs() + 15 * step)
        assert bool(((part.dequantize() - target).abs() <= step / 2 + slack).all())


def test_keys_and_values_take_their_own_low_sets():
    """With key_low_ratio and value_low_ratio apart, each side's low set is its own lowest scores."""
    gen = torch.Generator().manual_seed(2)
    x, scores = torch.randn(2, 20, 16, generator=gen), torch.rand(2, 20, generator=gen)
    scheme = KVQuantScheme("kv", 4, low_bits=2, value_cst=True, key_low_ratio=0.1, value_low_ratio=0.75)
    assert (scheme.key_ratio, scheme.value_ratio, scheme.splits) == (0.1, 0.75, True)
    k, v = quantize_kv(x, x * 0.5, scheme, scores)
    order = scores.argsort(-1)
    assert torch.equal(k.lo_index, order[:, :2].sort(-1).values)
    assert torch.equal(v.lo_index, order[:, :15].sort(-1).values)
    assert not KVQuantScheme("none", 4, low_bits=2, key_low_ratio=0.0, value_low_ratio=0.0).splits


def test_empty_sets_and_blocks():
    x = torch.randn(2, 10, 8)
    for axis in ("channel", "token"):
        empty = quantize(x[:, :0], 2, axis)
        assert empty.dequantize().shape == (2, 0, 8) and empty.nbytes() == 0
    q = quantize_mixed(x, torch.zeros(2, 10, dtype=torch.bool), 4, 2, "token", cst=True)
    assert q.lo.num_tokens == 0 and q.dequantize().shape == x.shape
    torch.testing.assert_close(q.dequantize(), cst_quantize(x, 4).dequantize())


def test_zipcache_default_split_fits_the_target_budget():
    """Spec B §1b, float16 parameters, measured from the cache's tiers at D = 64 (each tier stores its own
    key pair per channel and the block's c). The reference's split (keys and values of 40% of the tokens at
    2 bits, 60% at 4): 55.39 B per token and KV head, 0.2164x fp16 (codes alone 0.2x). kvsqueeze's default
    (every key at 4 bits, the values of 75% of the tokens at 2 bits): 56.19 B, 0.2195x."""
    tokens, head_dim = 4096, 64
    pair = 2 * head_dim  # (mn, s) per channel
    value_params = 2 * tokens + 2 * head_dim  # (mn, s) per token, plus c in each of the two tiers

    def codes(key_low: int, value_low: int) -> int:  # 4-bit: D / 2 bytes per row, 2-bit: D / 4
        return sum(
            n * head_dim // 2 + low * head_dim // 4
            for n, low in ((tokens - key_low, key_low), (tokens - value_low, value_low))
        )

    n_lo = int(0.4 * tokens)
    reference = codes(n_lo, n_lo) + 2 * (2 * pair + value_params)
    assert bytes_per_token(ZIPCACHE_REFERENCE, tokens, head_dim) * tokens == reference
    default = codes(0, int(0.75 * tokens)) + 2 * (2 * pair + value_params)
    measured = bytes_per_token(ZIPCACHE, tokens, head_dim)
    assert measured * tokens == default
    assert measured / fp16_bytes_per_token(head_dim) <= 0.22
    assert bytes_per_token(ZIPCACHE, tokens, 128) / fp16_bytes_per_token(128) <= 0.22
    fp32_params = dataclasses.replace(ZIPCACHE, param_dtype=torch.float32)
    assert bytes_per_token(fp32_params, tokens, head_dim) / fp16_bytes_per_token(head_dim) > 0.22


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kivi_bytes_per_token(head_dim):
    # 2-bit codes plus one float16 (mn, s) pair per 32 elements, for keys and for values: 3 bits per element.
    assert bytes_per_token(KIVI_2, 4096, head_dim) == 2 * head_dim * 3 / 8
    assert bytes_per_token(kivi_scheme(4), 4096, head_dim) / fp16_bytes_per_token(head_dim) == 5 / 16
    assert bytes_per_token(kivi_scheme(8), 4096, head_dim) / fp16_bytes_per_token(head_dim) == 9 / 16


def group_squared_error(x: torch.Tensor, q) -> torch.Tensor:
    """Per (segment, group, channel) squared reconstruction error of a per-channel block."""
    err = (q.dequantize(torch.float32) - x.float()).square()  # (S, T, D)
    s, t, d = err.shape
    return err.view(s, t // q.group_size, q.group_size, d).sum(2)


@settings(max_examples=100, deadline=None)
@given(block=blocks(axis="channel"))
def test_clip_search_never_raises_a_groups_squared_error(block):
    """search_clip keeps the full range unless a narrower one lowers the group's squared error, and every
    element inside the chosen range stays within half a step."""
    x, bits, axis, group, param_dtype = block
    plain = quantize(x, bits, axis, group, param_dtype=param_dtype)
    clipped = quantize(x, bits, axis, group, param_dtype=param_dtype, clip=True)
    assert clipped.nbytes() == plain.nbytes()
    bound = group_squared_error(x, plain)
    assert bool((group_squared_error(x, clipped) <= bound * (1 + 1e-5) + 1e-12).all())
    x32, step = x.float(), clipped.element_scale()
    lo = clipped.mins.float().repeat_interleave(clipped.group_size, dim=-2)
    inside = (x32 >= lo) & (x32 <= lo + ((1 << bits) - 1) * step)
    err = (clipped.dequantize(torch.float32) - x32).abs()
    assert bool((err <= step / 2 + 1e-6 * (2 * x32.abs() + 255 * step))[inside].all())


def test_clip_search_narrows_an_outlier_channel_at_two_bits():
    """One outlier among 64 tokens: the 2-bit range shrinks and the channel's squared error drops by 40%."""
    x = torch.linspace(-1, 1, 64)[None, :, None].repeat(1, 1, 4)  # (1, 64, 4)
    x[0, 0, :] = 6.0
    plain, clipped = quantize(x, 2, "channel"), quantize(x, 2, "channel", clip=True)
    assert bool((clipped.scales < plain.scales).all())
    assert bool((group_squared_error(x, clipped) < 0.6 * group_squared_error(x, plain)).all())


@settings(max_examples=50, deadline=None)
@given(block=blocks(axis="channel"), clip=st.booleans())
def test_cache_rows_get_the_dense_quantizers_key_parameters(block, clip):
    """The cache's row-group parameters (kvsqueeze.quantization.rows) equal the dense quantizer's, clipped or
    not, when each row group is one dense group."""
    x, bits, axis, group, param_dtype = block
    dense = quantize(x, bits, axis, group, param_dtype=param_dtype, clip=clip)
    s, t, d = x.shape
    groups = torch.arange(s * t) // dense.group_size  # rows of a segment, group after group
    steps, mins = group_channel_params(
        x.reshape(-1, d), groups, s * t // dense.group_size, bits, clip=clip, param_dtype=param_dtype
    )
    assert torch.equal(steps, dense.scales.reshape(-1, d)) and torch.equal(mins, dense.mins.reshape(-1, d))
