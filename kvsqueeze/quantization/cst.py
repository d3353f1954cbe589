"""ZipCache's channel-separable token-wise quantization (CST) of values (spec B §1b).

Per channel ``j`` of a block ``X`` ``(*, T, D)``: ``c_j = sqrt(max_t |X[t, j]|)``. The block is divided by
``c`` (``X' = X / c``), which evens out outlier channels, ``X'`` is quantized per token (one min/step per
token across its channels, or per ``group_size`` channels), and the reconstruction is
``x_hat = deq(X') * c``. The stored parameters are ``2 * T * D / group_size`` token parameters plus the
``D`` channel scales, against ``2 * T * D / n`` for plain groupwise quantization.
"""

from __future__ import annotations

import torch

from kvsqueeze.quantization.quantizer import (
    EPS,
    QuantizedTensor,
    check_block,
    quantize_fp32,
    round_up,
)


def channel_scale(
    x: torch.Tensor, *, param_dtype: torch.dtype = torch.float16, eps: float = EPS
) -> torch.Tensor:
    """CST divisor ``c = sqrt(max_t |x|)`` per channel of ``x`` ``(*, T, D)``, shape ``(*, D)``.

    Computed in fp32, clamped to at least ``eps`` (an all-zero channel would divide by zero) and stored in
    ``param_dtype``, rounded up so it stays positive. An empty block (``T = 0``) gets ``c = eps``.
    """
    if x.shape[-2] == 0:
        peak = x.new_zeros(x.shape[:-2] + x.shape[-1:], dtype=torch.float32)
    else:
        peak = x.float().abs().amax(-2)  # (*, D)
    return round_up(peak.sqrt().clamp_min(eps), param_dtype)


def cst_quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    scale: torch.Tensor | None = None,
    param_dtype: torch.dtype = torch.float16,
    eps: float = EPS,
) -> QuantizedTensor:
    """Channel-separable token-wise quantization of a value block ``x`` ``(*, T, D)`` (spec B §1b).

    Args:
        x: the block.
        bits: 2, 4 or 8.
        group_size: channels per token group (``None``: all ``D`` channels, as in ZipCache).
        scale: a precomputed divisor ``c`` ``(*, D)`` from :func:`channel_scale`; ZipCache computes it once
            over the whole block and shares it between its 4-bit and 2-bit token sets. Default: computed
            from ``x``.
        param_dtype: storage dtype of mins, steps and ``c``.
        eps: smallest step and smallest ``c``.

    Returns:
        A :class:`QuantizedTensor` with ``axis="token"`` and ``channel_scale=c``; its ``nbytes()`` counts ``c``.
    """
    check_block(x, bits, param_dtype)
    if scale is None:
        scale = channel_scale(x, param_dtype=param_dtype, eps=eps)
    expected = x.shape[:-2] + x.shape[-1:]
    if scale.shape != expected:
        raise ValueError(f"channel scale must have shape {tuple(expected)}, got {tuple(scale.shape)}")
    separated = x.float() / scale.float().unsqueeze(-2)  # (*, T, D)
    return quantize_fp32(separated, bits, "token", group_size, param_dtype, eps, x.dtype, channel_scale=scale)
