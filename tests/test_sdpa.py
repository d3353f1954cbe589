"""kvsqueeze's SDPA: half-precision inputs on the CPU are attended in float32 and come back in their dtype."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvsqueeze.attention.sdpa import sdpa


class _Module(torch.nn.Module):
    is_causal = False
    num_key_value_groups = 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("queries", [1, 5])
def test_half_precision_attends_in_float32(dtype, queries):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 14, queries, 64, generator=gen).to(dtype)  # (B, H, Q, D)
    keys, values = (torch.randn(2, 2, 40, 64, generator=gen).to(dtype) for _ in range(2))  # (B, H_kv, T, D)
    mask = torch.rand(2, 1, queries, 40, generator=gen) > 0.3
    mask[..., 0] = True
    module = _Module()
    out = sdpa(module, query, keys, values, mask, scaling=0.125)
    assert out.dtype == dtype and out.shape == (2, queries, 14, 64)
    reference, _ = sdpa_attention_forward(
        module, query.float(), keys.float(), values.float(), mask, scaling=0.125
    )
    assert torch.equal(out, reference.to(dtype))


@pytest.mark.parametrize("mask_kind", ["additive", "none"])
def test_additive_and_absent_masks_in_half_precision(mask_kind):
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(1, 14, 6, 64, generator=gen).to(torch.bfloat16)
    keys, values = (torch.randn(1, 2, 6, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    mask = None
    if mask_kind == "additive":  # a causal mask as transformers' eager path builds it, in the model's dtype
        hidden = torch.ones(6, 6, dtype=torch.bool).triu(1)
        mask = torch.zeros(1, 1, 6, 6, dtype=torch.bfloat16).masked_fill(
            hidden, torch.finfo(torch.bfloat16).min
        )
    module = _Module()
    out = sdpa(module, query, keys, values, mask, scaling=0.125)
    float_mask = None if mask is None else mask.float()
    reference, _ = sdpa_attention_forward(
        module, query.float(), keys.float(), values.float(), float_mask, scaling=0.125
    )
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.to(torch.bfloat16))
