"""SDPA as every kvsqueeze attention path calls it: transformers' ``sdpa_attention_forward``, in float32 on
the CPU when the model runs in bfloat16 or float16.

PyTorch's CPU SDPA kernels are slow in half precision (torch 2.13, one thread, 14 query heads over 2 KV
heads of 64 channels): a one-token query over 4096 rows took 9.2 ms in bfloat16 against 1.0 ms with its
inputs cast to float32 and the output cast back, and a 2048-token causal prefill 187 ms against 151 ms. So a
bfloat16 model decoded 5x slower than a float32 one here (docs/RESULTS.md, dtype block) while its linear
layers ran 5x faster. The cast costs one read of the rows per call, and the softmax is then float32 (as
the eager implementation computes it). On other devices nothing is cast.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

HALF = (torch.bfloat16, torch.float16)


def sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, Q, D)
    keys: torch.Tensor,  # (B, H_kv, T, D)
    values: torch.Tensor,  # (B, H_kv, T, D)
    mask: torch.Tensor | None,  # bool or additive, broadcast to (B, H, Q, T); None: every row visible
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention output (B, Q, H, D) in ``query``'s dtype (transformers' layout after SDPA)."""
    dtype = query.dtype
    if query.device.type == "cpu" and dtype in HALF:
        query, keys, values = query.float(), keys.float(), values.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    out, _ = sdpa_attention_forward(module, query, keys, values, mask, dropout=dropout, scaling=scaling)
    return out.to(dtype)
