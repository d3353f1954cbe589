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
