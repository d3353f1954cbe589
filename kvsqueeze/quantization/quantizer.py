"""Asymmetric b-bit quantization of a block of cached keys or values (spec B §0, §1b, §4.2).

A block is a tensor ``(*, T, D)``: any leading dimensions (typically ``S = B * H_kv`` segments, one per
(sequence, KV head), so every head gets its own parameters), then ``T`` tokens and ``D`` head channels.
Each *group* of elements gets its own minimum ``mn`` and step ``s`` (spec §0)::

    mn = min G,  mx = max G,  s = max((mx - mn) / (2**b - 1), eps)
    q  = clamp(round((x - mn) / s), 0, 2**b - 1),   x_hat = q * s + mn

Two group shapes, named by the axis that owns a parameter pair:

* ``axis="channel"`` (keys, KIVI and ZipCache): one (mn, s) per channel and per block of ``group_size``
  consecutive tokens; ``group_size=None`` means all ``T`` tokens (ZipCache: one pair per channel per
  precision set). ``T`` must be a multiple of ``group_size`` (KIVI quantizes whole groups and keeps the
  remainder in a full-precision residual). Parameters: ``(*, T // group_size, D)``.
* ``axis="token"`` (values, KIVI): one (mn, s) per token and per ``group_size`` consecutive channels;
  ``group_size=None`` means all ``D`` channels (one pair per token, ZipCache). ``group_size`` must divide
  ``D``. Parameters: ``(*, T, D // group_size)``.

Arithmetic is fp32 whatever the input dtype. The parameters are *stored* in ``param_dtype`` (float16 by
default, as KIVI and ZipCache store them; it is what brings ZipCache's 4/2 split under 0.22x the fp16
bytes, see :mod:`kvsqueeze.quantization.budget`). They are rounded before the codes are computed, with
``mn`` rounded down and ``s`` rounded up, so the stored pair still covers the group and every element
keeps the bound ``|x - x_hat| <= s / 2`` for its stored step ``s`` (up to fp32 rounding). A constant group
is reproduced exactly when its value is representable in ``param_dtype``.

Plain PyTorch: no transformers import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kvsqueeze.quantization.packing import check_bits, check_head_dim, pack_codes, unpack_codes

Axis = Literal["channel", "token"]
AXES = ("channel", "token")
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = 1e-6  # smallest step: keeps constant groups finite (spec §0 "clamp s >= eps")
# range ratios search_clip tries, the full range first
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized ``(*, T, D)`` block: packed codes plus the per-group parameters to decode them.

    ``nbytes()`` is measured from the stored tensors (codes, scales, mins and the CST channel scales), so
    it reflects the packing and the parameter dtype. See the module docstring for the group layout.
    """

    codes: torch.Tensor  # (*, T, D * bits // 8) uint8, packed along D
    scales: torch.Tensor  # channel axis: (*, T // G, D); token axis: (*, T, D // G); param dtype
    mins: torch.Tensor  # same shape and dtype as scales
    bits: int
    axis: Axis
    group_size: int  # tokens per group (channel axis) or channels per group (token axis), resolved
    shape: torch.Size  # (*, T, D) of the original block
    dtype: torch.dtype  # dtype of the original block, and of dequantize() by default
    channel_scale: torch.Tensor | None = None  # (*, D) CST divisor c (spec §1b), None for plain blocks

    @property
    def num_tokens(self) -> int:
        return self.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.shape[-1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this block stores."""
        extra = () if self.channel_scale is None else (self.channel_scale,)
        return (self.codes, self.scales, self.mins, *extra)

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (codes + scales + mins + channel scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reconstruction ``x_hat`` ``(*, T, D)``, in ``dtype`` (default: the original dtype)."""
        q = unpack_codes(self.codes, self.bits).float()  # (*, T, D)
        grouped, dim = _grouped(q, self.axis, self.group_size)  # one axis per group member
        out = grouped * self.scales.float().unsqueeze(dim) + self.mins.float().unsqueeze(dim)
        out = out.reshape(self.shape)  # (*, T, D) fp32
        if self.channel_scale is not None:
            out = out * self.channel_scale.float().unsqueeze(-2)
        return out.to(self.dtype if dtype is None else dtype)

    def element_scale(self) -> torch.Tensor:
        """The step ``s`` that applies to each element, in the block's units, ``(*, T, D)`` fp32.

        For CST blocks it is already multiplied by the channel scale ``c``. The reconstruction error of an
        element is at most half of it (up to fp32 rounding).
        """
        scales = self.scales.float()
        if self.axis == "channel":
            step = scales.repeat_interleave(self.group_size, dim=-2)  # (*, T // G, D) -> (*, T, D)
        else:
            step = scales.repeat_interleave(self.group_size, dim=-1)  # (*, T, D // G) -> (*, T, D)
        if self.channel_scale is not None:
            step = step * self.channel_scale.float().unsqueeze(-2)
        return step


def quantize(
    x: torch.Tensor,
    bits: int,
    axis: Axis,
    group_size: int | None = None,
    *,
    param_dtype: torch.dtype = torch.float16,
    eps: float = EPS,
    clip: bool = False,
) -> QuantizedTensor:
    """Quantize a block ``x`` ``(*, T, D)`` to ``bits`` bits with per-channel or per-token groups.

    Spec B §0 (quantizer), §4.2 (KIVI: keys ``axis="channel"`` with ``group_size`` tokens, values
    ``axis="token"`` with ``group_size`` channels), §1b (ZipCache keys: ``axis="channel"``,
    ``group_size=None``). ``group_size`` is explained in the module docstring. With ``clip=True`` each
    group's range is narrowed where that lowers its squared error (:func:`search_clip`).

    Raises:
        ValueError: bits not in {2, 4, 8}; a group size that does not divide the grouped axis; a head
            dimension the packing cannot fill whole bytes with; non-finite values, or values outside the
            range of ``param_dtype``.
    """
    check_block(x, bits, param_dtype)
    return quantize_fp32(x.float(), bits, axis, group_size, param_dtype, eps, x.dtype, clip=clip)


def check_block(x: torch.Tensor, bits: int, param_dtype: torch.dtype) -> None:
    """Validate the arguments shared by every quantizer (one-line ``ValueError`` messages)."""
    check_bits(bits)
    if x.dim() < 2:
        raise ValueError(f"expected a (*, T, D) block of tokens by channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point block, got {x.dtype}")
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"unsupported parameter dtype {param_dtype}; choose float16, bfloat16 or float32")
    check_head_dim(x.shape[-1], bits)


def resolve_group_size(axis: str, group_size: int | None, num_tokens: int, head_dim: int) -> int:
    """The number of elements per group along the grouped axis, validated."""
    if axis not in AXES:
        raise ValueError(f"unknown quantization axis {axis!r}; choose 'channel' (keys) or 'token' (values)")
    if axis == "token":
        group_size = head_dim if group_size is None else group_size
        if group_size <= 0 or head_dim % group_size:
            raise ValueError(f"group size {group_size} does not divide the head dimension {head_dim}")
        return group_size
    if group_size is None:
        return max(num_tokens, 1)
    if group_size <= 0 or num_tokens % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the {num_tokens} tokens of the block; quantize whole "
            "groups and keep the remainder in full precision"
        )
    return group_size


def quantize_fp32(
    x: torch.Tensor,
    bits: int,
    axis: Axis,
    group_size: int | None,
    param_dtype: torch.dtype,
    eps: float,
    dtype: torch.dtype,
    channel_scale: torch.Tensor | None = None,
    clip: bool = False,
) -> QuantizedTensor:
    """Quantize an fp32 block ``x`` ``(*, T, D)`` already validated by :func:`check_block`.

    ``dtype`` is recorded as the block's original dtype; ``channel_scale`` is recorded for CST blocks (``x``
    is then already divided by it); ``clip`` searches each group's range (:func:`search_clip`).
    """
    *lead, num_tokens, head_dim = x.shape
    size = resolve_group_size(axis, group_size, num_tokens, head_dim)
    grouped, reduce_dim = _grouped(x, axis, size)
    if grouped.numel():
        lo, hi = grouped.amin(reduce_dim), grouped.amax(reduce_dim)  # parameter shape, fp32
    else:
        lo = hi = grouped.new_zeros(_param_shape(x.shape, axis, size))

    def squared_error(mins: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        step, low = scales.float().unsqueeze(reduce_dim), mins.float().unsqueeze(reduce_dim)
        rebuilt = round_codes(grouped, step, low, bits) * step + low
        return (rebuilt - grouped).square().sum(reduce_dim)

    if clip:
        mins, scales = search_clip(lo, hi, bits, param_dtype, eps, squared_error)
    else:
        mins, scales = range_params(lo, hi, bits, param_dtype, eps)
    if not bool(torch.isfinite(mins).all() and torch.isfinite(scales).all()):
        raise ValueError(
            f"cannot quantize: the block has inf/nan values or values outside the {param_dtype} range of "
            "the stored parameters (pass param_dtype=torch.float32)"
        )
    step, low = scales.float().unsqueeze(reduce_dim), mins.float().unsqueeze(reduce_dim)
    q = round_codes(grouped, step, low, bits).to(torch.uint8)  # grouped shape
    codes = pack_codes(q.reshape(*lead, num_tokens, head_dim), bits)  # (*, T, D * bits // 8)
    return QuantizedTensor(
        codes=codes,
        scales=scales,
        mins=mins,
        bits=bits,
        axis=axis,
        group_size=size,
        shape=torch.Size((*lead, num_tokens, head_dim)),
        dtype=dtype,
        channel_scale=channel_scale,
    )


def _grouped(x: torch.Tensor, axis: str, size: int) -> tuple[torch.Tensor, int]:
    """View ``x`` ``(*, T, D)`` with one axis per group member; return the view and that axis."""
    *lead, num_tokens, head_dim = x.shape
    if axis == "channel":
        return x.reshape(*lead, num_tokens // size, size, head_dim), -2  # (*, T // G, G, D)
    return x.reshape(*lead, num_tokens, head_dim // size, size), -1  # (*, T, D // G, G)


def _param_shape(shape: torch.Size, axis: str, size: int) -> tuple[int, ...]:
    *lead, num_tokens, head_dim = shape
    if axis == "channel":
        return (*lead, num_tokens // size, head_dim)
    return (*lead, num_tokens, head_dim // size)


def round_codes(x: torch.Tensor, step: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 codes ``clamp(round((x - mn) / s), 0, 2**b - 1)`` of ``x`` under broadcastable ``s`` and ``mn``."""
    return torch.round((x - low) / step).clamp_(0, (1 << bits) - 1)


def range_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, param_dtype: torch.dtype, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(mins, steps)`` of groups spanning ``[lo, hi]`` (fp32, any shape): ``mn`` rounded down and
    ``s = (hi - mn) / (2**b - 1)`` rounded up in ``param_dtype``, so the stored pair still covers the range."""
    mins = round_down(lo, param_dtype)
    steps = round_up(((hi - mins.float()) / ((1 << bits) - 1)).clamp_min(eps), param_dtype)
    return mins, steps


def search_clip(
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    param_dtype: torch.dtype,
    eps: float,
    squared_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the range ``[lo, hi]`` narrowed about its centre by the ratio of :data:`CLIP_RATIOS` that
    gives the smallest ``squared_error(mins, steps)`` (a tensor of the parameters' shape).

    The full range (ratio 1) is tried first and kept on ties, so no group's squared error exceeds plain
    min/max quantization's. Elements outside a narrowed range are clamped to its ends: the ``s / 2`` bound
    then holds only inside it. At 2 bits this trades a few clamped outliers for a step up to half as wide
    (the MSE clipping of AWQ and OmniQuant, here with a fixed grid and no calibration data).
    """
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    best_mins, best_steps = range_params(lo, hi, bits, param_dtype, eps)
    best = squared_error(best_mins, best_steps)
    for ratio in CLIP_RATIOS[1:]:
        mins, steps = range_params(centre - half * ratio, centre + half * ratio, bits, param_dtype, eps)
        err = squared_error(mins, steps)
        better = err < best
        best = torch.where(better, err, best)
        best_mins = torch.where(better, mins, best_mins)
        best_steps = torch.where(better, steps, best_steps)
    return best_mins, best_steps


def round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, rounded toward minus infinity (the largest value ``<= x``)."""
    y = x.to(dtype)
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, -torch.inf)), y)


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, rounded toward plus infinity (the smallest value ``>= x``)."""
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, torch.inf)), y)
