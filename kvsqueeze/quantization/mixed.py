"""Mixed precision: a block's tokens split into a high-bit and a low-bit set (ZipCache, spec B §1b-c).

The two sets are quantized separately, each with its own parameters: keys per channel over the tokens of
their set, values by CST with one channel scale ``c`` shared by both sets. Each set keeps its tokens in
temporal order; ``hi_index`` and ``lo_index`` say where they sit in the block. Every leading index (every
(sequence, KV head) segment) must put the same number of tokens in the low set, so both sets stay dense
tensors; ZipCache's ``floor(r_lo * l)`` selection per head satisfies this when segments have equal length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.quantization.cst import channel_scale, cst_quantize
from kvsqueeze.quantization.quantizer import EPS, Axis, QuantizedTensor, quantize


@dataclass(frozen=True, eq=False)
class MixedQuantized:
    """A ``(*, T, D)`` block stored as a high-bit set and a low-bit set of tokens."""

    hi: QuantizedTensor  # (*, T_hi, D)
    lo: QuantizedTensor  # (*, T_lo, D)
    hi_index: torch.Tensor  # (*, T_hi) int64: block position of each high-bit token, increasing
    lo_index: torch.Tensor  # (*, T_lo) int64: block position of each low-bit token, increasing

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hi.shape[:-2], self.hi.num_tokens + self.lo.num_tokens, self.hi.head_dim))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors of both sets, a shared CST channel scale listed once."""
        unique: dict[int, torch.Tensor] = {}
        for tensor in (*self.hi.tensors(), *self.lo.tensors()):
            unique.setdefault(id(tensor), tensor)
        return tuple(unique.values())

    def nbytes(self) -> int:
        """Bytes of codes and parameters of both sets (the shared ``c`` counted once).

        The token indices are not counted: a cache stores each row's position anyway, and keeping the rows
        in hi|lo order makes the split implicit.
        """
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reconstruction ``(*, T, D)`` with every token back at its block position."""
        hi, lo = self.hi.dequantize(dtype), self.lo.dequantize(dtype)
        out = hi.new_empty(self.shape)
        out.scatter_(-2, self.hi_index.unsqueeze(-1).expand_as(hi), hi)
        out.scatter_(-2, self.lo_index.unsqueeze(-1).expand_as(lo), lo)
        return out


def split_tokens(low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the high and low tokens of a ``(*, T)`` bool mask, each in temporal order.

    Returns ``(hi_index (*, T_hi), lo_index (*, T_lo))``. Raises ``ValueError`` if the leading indices do
    not all have the same number of low tokens.
    """
    counts = low.sum(-1).flatten()
    num_low = int(counts[0]) if counts.numel() else 0
    if bool((counts != num_low).any()):
        raise ValueError(
            f"every segment must put the same number of tokens in the low set, got between "
            f"{int(counts.min())} and {int(counts.max())}"
        )
    order = torch.sort(low.to(torch.int8), dim=-1, descending=True, stable=True).indices  # (*, T)
    return order[..., num_low:], order[..., :num_low]


def quantize_mixed(
    x: torch.Tensor,
    low: torch.Tensor,
    hi_bits: int,
    lo_bits: int,
    axis: Axis,
    group_size: int | None = None,
    *,
    low_group_size: int | None = None,
    cst: bool = False,
    param_dtype: torch.dtype = torch.float16,
    eps: float = EPS,
    clip: bool = False,
) -> MixedQuantized:
    """Quantize the tokens of ``x`` ``(*, T, D)`` marked by ``low`` ``(*, T)`` at ``lo_bits``, the rest at
    ``hi_bits``, each set with its own parameters (spec B §1b "Mixed precision").

    ``axis`` and ``group_size`` are as in :func:`~kvsqueeze.quantization.quantizer.quantize` and apply to
    each set separately (ZipCache keys: ``axis="channel"``, ``group_size=None``); ``low_group_size``, if
    given, replaces ``group_size`` for the low set, and ``clip`` is passed on to
    :func:`~kvsqueeze.quantization.quantizer.quantize`. With ``cst=True`` the values are quantized by CST
    (``axis`` must be ``"token"``), with ``c`` computed over the whole block and shared by the two sets.
    """
    if low.shape != x.shape[:-1]:
        raise ValueError(f"low-set mask must have shape {tuple(x.shape[:-1])}, got {tuple(low.shape)}")
    if cst and axis != "token":
        raise ValueError("CST quantizes values per token; use axis='token' with cst=True")
    hi_index, lo_index = split_tokens(low)
    x_hi = x.gather(-2, hi_index.unsqueeze(-1).expand(*hi_index.shape, x.shape[-1]))  # (*, T_hi, D)
    x_lo = x.gather(-2, lo_index.unsqueeze(-1).expand(*lo_index.shape, x.shape[-1]))  # (*, T_lo, D)
    if cst:
        c = channel_scale(x, param_dtype=param_dtype, eps=eps)  # (*, D), shared by both sets
        hi = cst_quantize(x_hi, hi_bits, group_size, scale=c, param_dtype=param_dtype, eps=eps)
        lo = cst_quantize(x_lo, lo_bits, group_size, scale=c, param_dtype=param_dtype, eps=eps)
    else:
        low_group_size = group_size if low_group_size is None else low_group_size
        hi = quantize(x_hi, hi_bits, axis, group_size, param_dtype=param_dtype, eps=eps, clip=clip)
        lo = quantize(x_lo, lo_bits, axis, low_group_size, param_dtype=param_dtype, eps=eps, clip=clip)
    return MixedQuantized(hi=hi, lo=lo, hi_index=hi_index, lo_index=lo_index)
