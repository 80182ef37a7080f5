"""Rotary embedding tables (NeoX rotate-half over the whole head).

When the checkpoint stores `inv_freq` in bf16 (the published model), the reference builds its table entirely in
bf16: position, angle, cos and sin are each rounded to bf16. Reproducing that rounding is what exact parity with
the published model needs; with a float32 inv_freq there is no rounding.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def default_inv_freq(head_dim: int, base: float) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(base) ** exponents)).astype(np.float32)


def rope_cos_sin(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32 [len(positions), head_dim/2], with bf16 rounding iff inv_freq is bf16."""
    if inv_freq.dtype == BF16:
        t = positions.astype(BF16).astype(np.float32)
        angle = (t[:, None] * inv_freq.astype(np.float32)[None, :]).astype(BF16).astype(np.float32)
        cos = np.cos(angle).astype(BF16).astype(np.float32)
        sin = np.sin(angle).astype(BF16).astype(np.float32)
        return cos, sin
    angle = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rope_table(inv_freq: np.ndarray, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-head tables [max_positions, head_dim] (each half repeated) ready to gather by position id."""
    cos, sin = rope_cos_sin(inv_freq, np.arange(max_positions))
    return np.concatenate([cos, cos], axis=1), np.concatenate([sin, sin], axis=1)
