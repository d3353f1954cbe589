"""Quantization of packed cache rows: any number of rows per segment, key parameters per row group.

:mod:`~kvsqueeze.quantization.quantizer` works on dense ``(*, T, D)`` blocks, where every segment holds the
same number of tokens. A cache after eviction is ragged (per-head budgets, per-sequence prompt lengths), and
its rows are evicted one by one later (H2O, CAKE's cascade). So the cache stores rows the same way its full
precision rows are stored: one packed row per token, ``(N, D * bits / 8)`` codes plus per-token value
parameters, while the parameters that span tokens (per-channel key minimum and step, CST's channel scale)
sit in a small table indexed by *row group*. A row group is the set of rows one quantization shares a key
parameter pair over: one (segment, block, tier) for ZipCache, split into runs of ``low_key_group`` tokens
where the tier's keys are at 2 bits, and ``G`` consecutive tokens of one segment for KIVI. Evicting a row
later frees its codes; its group's parameters stay valid for the rows left.

Arithmetic is fp32, parameters are rounded to ``param_dtype`` (down for minima, up for steps) before the
codes are computed, as in the dense quantizer, so the error bound ``|x - x_hat| <= s / 2`` holds per row
(inside the group's range, when a clip search narrowed it).

Plain PyTorch: no transformers import.
"""

from __future__ import annotations

import torch

from kvsqueeze.quantization.packing import check_bits, check_head_dim, pack_codes, unpack_codes_float
from kvsqueeze.quantization.quantizer import EPS, range_params, round_codes, search_clip


def group_channel_params(
    x: torch.Tensor,  # (N, D)
    group: torch.Tensor,  # (N,) int64 in [0, num_groups)
    num_groups: int,
    bits: int,
    *,
    clip: bool = False,
    param_dtype: torch.dtype = torch.float16,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel minimum and step of every row group: ``(num_groups, D)`` each, in ``param_dtype``.

    Groups without rows get ``mn = 0`` and ``s = eps``. With ``clip``, each (group, channel) range is
    narrowed where that lowers its squared error (:func:`~kvsqueeze.quantization.quantizer.search_clip`).
    """
    check_bits(bits)
    n, d = x.shape
    index = group[:, None].expand(n, d)
    x = x.float()
    lo = x.new_zeros(num_groups, d).scatter_reduce(0, index, x, "amin", include_self=False)
    hi = x.new_zeros(num_groups, d).scatter_reduce(0, index, x, "amax", include_self=False)

    def squared_error(mins: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        step, low = steps.float()[group], mins.float()[group]  # (N, D)
        rebuilt = round_codes(x, step, low, bits) * step + low
        return x.new_zeros(num_groups, d).index_add_(0, group, (rebuilt - x).square())

    if clip:
        mins, steps = search_clip(lo, hi, bits, param_dtype, eps, squared_error)
    else:
        mins, steps = range_params(lo, hi, bits, param_dtype, eps)
    _check_finite(mins, steps, param_dtype)
    return steps, mins


def group_channel_peak(x: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``max |x|`` per channel of every row group, ``(num_groups, D)`` fp32 (CST's ``c`` is its root)."""
    n, d = x.shape
    return x.new_zeros(num_groups, d, dtype=torch.float32).scatter_reduce(
        0, group[:, None].expand(n, d), x.float().abs(), "amax", include_self=False
    )


def token_params(
    x: torch.Tensor,  # (N, D)
    bits: int,
    group_size: int | None = None,
    *,
    param_dtype: torch.dtype = torch.float16,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token minimum and step over groups of ``group_size`` channels: ``(N, D // G)`` each."""
    check_bits(bits)
    n, d = x.shape
    g = d if group_size is None else group_size
    if g <= 0 or d % g:
        raise ValueError(f"group size {g} does not divide the head dimension {d}")
    grouped = x.float().view(n, d // g, g)
    mins, steps = range_params(grouped.amin(-1), grouped.amax(-1), bits, param_dtype, eps)
    _check_finite(mins, steps, param_dtype)
    return steps, mins


def encode(x: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes ``(N, D * bits / 8)`` of ``x`` ``(N, D)`` under per-element-broadcastable parameters.

    ``steps`` and ``mins`` are ``(N, D)`` (per-channel parameters gathered per row) or ``(N, D // G)``
    (per-token parameters over channel groups).
    """
    n, d = x.shape
    check_head_dim(d, bits)
    step, low = broadcast_params(steps, d), broadcast_params(mins, d)
    return pack_codes(round_codes(x.float(), step, low, bits).to(torch.uint8), bits)


def decode_tokens(codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 reconstruction ``(N, D)`` of packed codes under per-token parameters ``(N, D // G)``."""
    q = unpack_codes_float(codes, bits)  # (N, D)
    n, d = q.shape
    g = d // steps.shape[-1]
    grouped = q.view(n, d // g, g)
    grouped.mul_(steps.float().unsqueeze(-1)).add_(mins.float().unsqueeze(-1))
    return q


def scale_by_group(
    x: torch.Tensor,  # (N, D) fp32, changed in place
    scale: torch.Tensor,  # (num_groups, D)
    shift: torch.Tensor | None,  # (num_groups, D) or None
    counts: torch.Tensor,  # (num_groups,) rows of each group; the rows of x are grouped in this order
) -> torch.Tensor:
    """``x * scale[g] (+ shift[g])`` for the group ``g`` of every row, without a per-row copy of the
    parameters when the non-empty groups all hold the same number of rows (a reshape suffices)."""
    present = counts > 0
    sizes = counts[present]
    scale = scale[present].float()
    shift = None if shift is None else shift[present].float()
    if sizes.numel() and bool((sizes == sizes[0]).all()):
        grouped = x.view(sizes.numel(), int(sizes[0]), x.shape[-1])
        grouped.mul_(scale.unsqueeze(1))
        if shift is not None:
            grouped.add_(shift.unsqueeze(1))
        return x
    x.mul_(scale.repeat_interleave(sizes, dim=0))
    if shift is not None:
        x.add_(shift.repeat_interleave(sizes, dim=0))
    return x


def broadcast_params(params: torch.Tensor, d: int) -> torch.Tensor:
    """fp32 (N, D // G) -> (N, D) by repeating each group's parameter over its channels; (N, D) unchanged."""
    params = params.float()
    if params.shape[-1] == d:
        return params
    return params.repeat_interleave(d // params.shape[-1], dim=-1)


def _check_finite(mins: torch.Tensor, steps: torch.Tensor, param_dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(mins).all() and torch.isfinite(steps).all()):
        raise ValueError(
            f"cannot quantize: the rows have inf/nan values or values outside the {param_dtype} range of "
            "the stored parameters (use float32 parameters)"
        )
