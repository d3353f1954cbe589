"""Bit packing of low-bit codes into uint8, along the last axis (the head dimension).

Layout: with ``k = 8 // bits`` codes per byte, byte ``j`` of a row holds codes ``k*j .. k*j + k - 1``,
the first code in the lowest bits::

    byte_j = c[k*j] | c[k*j + 1] << bits | ... | c[k*j + k - 1] << (k - 1) * bits

So 2-bit codes go four to a byte, 4-bit codes two to a byte, 8-bit codes one to a byte. Packing along the
head dimension keeps every token row self-contained (a row of ``D`` codes becomes ``D * bits / 8`` bytes),
which is what lets a cache store the packed codes as one more per-row field and still evict single rows.

Plain PyTorch, vectorized (no loop over elements).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> None:
    """Raise a one-line ``ValueError`` unless ``bits`` is 2, 4 or 8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; choose 2, 4 or 8")


def codes_per_byte(bits: int) -> int:
    """How many ``bits``-bit codes share one byte (4, 2 or 1)."""
    check_bits(bits)
    return 8 // bits


def check_head_dim(head_dim: int, bits: int) -> None:
    """Raise a one-line ``ValueError`` unless ``head_dim`` codes fill whole bytes at ``bits`` bits."""
    per_byte = codes_per_byte(bits)
    if head_dim % per_byte:
        raise ValueError(
            f"head dimension {head_dim} is not a multiple of {per_byte}, which {bits}-bit packing needs "
            f"({per_byte} codes per byte)"
        )


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)  # (k,)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into bytes along the last axis.

    Args:
        codes: integer tensor ``(*, D)``; every value must lie in ``[0, 2**bits - 1]`` (not checked: the
            quantizer clamps before packing).
        bits: 2, 4 or 8.

    Returns:
        uint8 tensor ``(*, D * bits // 8)``.
    """
    check_head_dim(codes.shape[-1], bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.clone()
    per_byte = 8 // bits
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)  # (*, D/k, k)
    # The shifted codes occupy disjoint bits, so their sum is their bitwise or (and stays below 256).
    return (grouped << _shifts(bits, codes.device)).sum(-1, dtype=torch.uint8)  # (*, D/k)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``(*, D * bits // 8)`` to uint8 codes ``(*, D)``."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask  # (*, D/k, k)
    return codes.flatten(-2)  # (*, D)


_FLOAT_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def unpack_codes_float(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`unpack_codes` straight to float32 ``(*, D)``, by one table lookup per byte (the decode path)."""
    check_bits(bits)
    key = (bits, packed.device)
    if key not in _FLOAT_TABLES:
        byte = torch.arange(256, dtype=torch.uint8, device=packed.device)
        _FLOAT_TABLES[key] = ((byte[:, None] >> _shifts(bits, packed.device)) & ((1 << bits) - 1)).float()
    table = _FLOAT_TABLES[key]  # (256, 8 // bits): the codes of every byte value
    out = table.index_select(0, packed.reshape(-1).int())  # (numel, 8 // bits)
    return out.view(*packed.shape[:-1], packed.shape[-1] * (8 // bits))
