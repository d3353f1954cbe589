"""Rows of vLLM's paged KV cache, read and written by slot (plain tensors, no vLLM import).

vLLM keeps each attention layer's cache in blocks of ``block_size`` tokens; a token's *slot* is
``block_id * block_size + offset``. The CPU backend (``CPU_ATTN``) holds a layer as
``(num_blocks, H_kv, block_size, 2 * D)``: per block and head, ``block_size * D`` key numbers, then as many
value numbers. How a token's channels are arranged inside each half depends on the kernel's instruction set
(its ``vec`` kernels keep keys channel-major, ``(D, block_size)``, and values token-major); rather than
hard-code one, :func:`probe_layout` writes index-coded rows with the backend's own cache-write op and reads
where each number landed. Other backends lay blocks out differently; :func:`check_layout` says so in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CacheWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``write(key, value, key_cache, value_cache, slots)``: the backend's op that stores rows (T, H_kv, D)."""


@dataclass(frozen=True)
class BlockLayout:
    """Where channel ``d`` of the token at offset ``t`` sits in a block's key half and value half (per head):
    ``keys[t, d]`` and ``values[t, d]`` are flat offsets in ``[0, block_size * D)``."""

    keys: torch.Tensor  # (block_size, D) long
    values: torch.Tensor  # (block_size, D) long

    @classmethod
    def token_major(cls, block_size: int, head_dim: int) -> BlockLayout:
        """Both halves ``(block_size, D)`` row-major."""
        flat = torch.arange(block_size * head_dim).view(block_size, head_dim)
        return cls(flat, flat)


def check_layout(kv_layer: torch.Tensor, block_size: int) -> None:
    """One-line ``ValueError`` unless ``kv_layer`` has the CPU backend's shape for ``block_size``."""
    if kv_layer.dim() != 4 or kv_layer.shape[2] != block_size or kv_layer.shape[3] % 2:
        raise ValueError(
            f"kvsqueeze's vLLM connector reads the CPU backend's layout (num_blocks, H_kv, {block_size}, 2 * D); "
            f"got a layer of shape {tuple(kv_layer.shape)}"
        )


def probe_layout(write: CacheWrite, block_size: int, head_dim: int, dtype: torch.dtype) -> BlockLayout:
    """The :class:`BlockLayout` the cache-write op ``write`` produces, found by writing index-coded rows.

    Codes go in base-256 digits (exact in bf16 and fp16), one pass per digit.
    """
    size = block_size * head_dim
    found = torch.zeros(2, size, dtype=torch.long)  # the code stored at each flat offset, keys and values
    codes = torch.arange(size).view(block_size, 1, head_dim)  # (T, H_kv=1, D)
    scale = 1
    while scale < size:
        digit = ((codes // scale) % 256).to(dtype)
        scratch = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_half, value_half = scratch.view(1, 1, 2 * block_size, head_dim).chunk(2, dim=2)
        write(digit, digit.clone(), key_half, value_half, torch.arange(block_size))
        found += scratch.reshape(2, size).round().long() * scale
        scale *= 256
    layouts = []
    for half in found:  # invert: code -> flat offset
        if not torch.equal(half.sort().values, torch.arange(size)):
            raise ValueError(
                "vLLM's cache-write op does not store rows as a permutation; cannot read them back"
            )
        index = torch.empty(size, dtype=torch.long)
        index[half] = torch.arange(size)
        layouts.append(index.view(block_size, head_dim))
    return BlockLayout(*layouts)


def slots_of(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """The slots of prompt positions ``start .. end - 1`` of a request holding ``block_ids``, (end - start,)."""
    if end > len(block_ids) * block_size:
        raise ValueError(f"positions up to {end} need more than the request's {len(block_ids)} blocks")
    positions = torch.arange(start, end)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


def _index(kv_layer: torch.Tensor, slots: torch.Tensor, layout: BlockLayout):
    """The layer as (num_blocks, H_kv, 2, block_size * D) and the (blocks, key offsets, value offsets) of
    ``slots``, shaped to pick (T, D, H_kv) numbers."""
    num_blocks, heads, block_size, width = kv_layer.shape
    halves = kv_layer.view(num_blocks, heads, 2, block_size * (width // 2))
    blocks, offsets = (slots // block_size)[:, None], slots % block_size  # (T, 1), (T,)
    return halves, blocks, layout.keys[offsets], layout.values[offsets]  # (T, D) each


def read_rows(
    kv_layer: torch.Tensor, slots: torch.Tensor, layout: BlockLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at ``slots`` (T,) of one layer, each (H_kv, T, D), copied."""
    halves, blocks, key_at, value_at = _index(kv_layer, slots, layout)
    keys = halves[:, :, 0][blocks, :, key_at]  # (T, D, H_kv)
    values = halves[:, :, 1][blocks, :, value_at]
    return keys.permute(2, 0, 1).contiguous(), values.permute(2, 0, 1).contiguous()


def write_rows(
    kv_layer: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: BlockLayout
) -> None:
    """Write ``keys`` and ``values`` (H_kv, T, D) into ``slots`` (T,) of one layer, in place."""
    halves, blocks, key_at, value_at = _index(kv_layer, slots, layout)
    key_half, value_half = halves[:, :, 0], halves[:, :, 1]  # views of the layer
    key_half[blocks, :, key_at] = keys.permute(1, 2, 0).to(kv_layer.dtype)
    value_half[blocks, :, value_at] = values.permute(1, 2, 0).to(kv_layer.dtype)
