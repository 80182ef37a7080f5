"""FRACTAL_NZ, the Ascend cube unit's tiled layout, for the 310P KV cache (its built-in ReshapeAndCache and
PagedAttention read and write NZ caches).

A matrix [M, N] of 16-bit values is held as [N / 16, M / 16, 16, 16]: column tiles of 16 (C0), and inside each
tile 16-row fractals, row-major; element (m, n) sits at [n // 16, m // 16, m % 16, n % 16] (M and N padded to
16). One 310P cache block is such a matrix: its block_size tokens by the KV heads' KV * head_dim values, so the
cache is [num_blocks, block_size, KV * head_dim] to MindSpore (its ND "host" shape, cast to NZ on the device by
FormatCast) and [num_blocks, KV * head_dim / 16, block_size, 16] in memory.
"""
from __future__ import annotations

import numpy as np

C0 = 16          # values per fractal row for fp16/bf16 (32 bytes)
FORMAT_ND = 2    # MindSpore's acl_format ids (ops.format_cast)
FORMAT_NZ = 29


def _padded(n: int) -> int:
    return -(-n // C0) * C0


def nz_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., M, N] -> [..., N1, M1, 16, 16] (N1, M1: the padded dims over 16)."""
    *batch, m, n = shape
    return (*batch, _padded(n) // C0, _padded(m) // C0, C0, C0)


def nd_to_nz(array: np.ndarray) -> np.ndarray:
    """[..., M, N] -> its NZ tiles [..., N1, M1, 16, 16], zero-padded."""
    *batch, m, n = array.shape
    padded = np.zeros((*batch, _padded(m), _padded(n)), array.dtype)
    padded[..., :m, :n] = array
    tiles = padded.reshape(*batch, _padded(m) // C0, C0, _padded(n) // C0, C0)
    axes = len(batch)
    return np.ascontiguousarray(tiles.transpose(*range(axes), axes + 2, axes, axes + 1, axes + 3))


def nz_to_nd(tiles: np.ndarray, m: int, n: int) -> np.ndarray:
    """The inverse of nd_to_nz: NZ tiles [..., N1, M1, 16, 16] -> [..., M, N] (padding dropped)."""
    *batch, n1, m1, _, _ = tiles.shape
    axes = len(batch)
    nd = tiles.transpose(*range(axes), axes + 1, axes + 2, axes, axes + 3).reshape(*batch, m1 * C0, n1 * C0)
    return np.ascontiguousarray(nd[..., :m, :n])


def nz_offset(m: int, n: int, rows: int) -> int:
    """Element (m, n)'s offset in a [rows, N] matrix's NZ memory (rows padded to 16)."""
    return (n // C0) * _padded(rows) * C0 + m * C0 + n % C0


def nz_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """The 310P NZ cache as MindSpore holds it: [num_blocks, block_size, KV * head_dim], both dims multiples of 16."""
    if block_size % C0 or (num_kv_heads * head_dim) % C0:
        raise ValueError(f"an NZ KV cache needs block_size and KV heads x head_dim in multiples of {C0}, got "
                         f"block_size {block_size}, {num_kv_heads} x {head_dim}")
    return num_blocks, block_size, num_kv_heads * head_dim
