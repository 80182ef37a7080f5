"""Weight quantization: `quantization="w8a16"` stores every projection weight as symmetric int8 with one fp32 scale
per output channel (round to nearest, scale = max |w| over the channel / 127), and the GEMMs dequantize it in
registers (q * scale, then fp32 products with the fp32 activations). `quantization="w8a8"` keeps the same weights and
also quantizes the activations, per token row and on the fly inside the GEMM, by the same rule (scale = max |x| over
the row / 127); the products are integer dot products (AVX512-VNNI), and y = sum * x_scale[row] * w_scale[col]
(kernels/cpu/gemm.h kInt8Dot). Applied by a kernel set's prepare_weight, one tensor at a time as the model is built,
to every projection of both experts, the lm_head and the vision encoder's transformer's linears; the embedding
table, the vision adapter (cogvlm2/vision.py says why) and the small added tensors (norms, biases) keep the compute
dtype."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor

QUANTIZATIONS = (None, "w8a16", "w8a8")
INT8_MAX = 127
UNSIGNED_ZERO = 128  # w8a8's activations enter vpdpbusd as q + 128 (its unsigned operand)


@dataclass(frozen=True)
class QuantizedWeight:
    """An int8 weight as a kernel set holds it: `values` in that backend's layout (the CPU kernels' int8 panels:
    [out / 32, in, 32] for w8a16, in k quads [out / 32, ceil(in / 4), 32, 4] for w8a8; or [out, in]) and `scales`
    [out] fp32; the weight is values * scales per output row. `offsets` (the w8a8 panels' only): [out] int32,
    column_offsets of the integers."""
    values: Tensor
    scales: Tensor
    offsets: Tensor | None = None

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def out_features(self) -> int:
        return int(self.scales.shape[0])


@dataclass(frozen=True)
class Int8Rows:
    """A weight quantized before it reaches a kernel set, as a quantized checkpoint stores it: int8 `values`
    [out, ...] and fp32 `scales` [out], the weight being values * scales per output row. prepare_weight takes it
    as it is, without quantizing again."""
    values: np.ndarray
    scales: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def reshape(self, *shape: int) -> "Int8Rows":
        """The rows reshaped (the leading, output dimension stays: one scale per row)."""
        values = self.values.reshape(*shape)
        if values.shape[0] != self.values.shape[0]:
            raise ValueError(f"reshaping int8 rows must keep the {self.values.shape[0]} output rows, got {shape}")
        return Int8Rows(values, self.scales)


def concat_rows(weights: list) -> "np.ndarray | Int8Rows":
    """Weights stacked along their output rows (gate over up): arrays, or int8 rows with their scales."""
    if all(isinstance(w, Int8Rows) for w in weights):
        return Int8Rows(np.concatenate([w.values for w in weights]), np.concatenate([w.scales for w in weights]))
    if any(isinstance(w, Int8Rows) for w in weights):
        raise TypeError("cannot stack quantized and unquantized weights")
    return np.concatenate(weights)


def int8_rows(weight: "np.ndarray | Int8Rows") -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, fp32 scales) of a weight: a float one quantized here, an Int8Rows as it came."""
    if isinstance(weight, Int8Rows):
        return np.ascontiguousarray(weight.values, np.int8), np.ascontiguousarray(weight.scales, np.float32)
    return quantize_int8(weight)


def check_quantization(quantization: str | None) -> str | None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    return quantization


QUANTIZE_CHUNK_ELEMENTS = 1 << 22  # rows widened to fp32 at a time: bounds the temporaries (16 MB), not the model


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] (any float dtype) -> (int8 [out, in], fp32 scales [out]); an all-zero row gets scale 1. Also w8a8's
    activations [tokens, in], a scale per token (the CPU kernels compute the same fp32 quotients and roundings)."""
    out, inner = weight.shape
    q, scales = np.empty((out, inner), np.int8), np.empty(out, np.float32)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(inner, 1))
    for r0 in range(0, out, step):
        w = np.asarray(weight[r0:r0 + step], np.float32)
        absmax = np.abs(w).max(axis=1)
        chunk_scales = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
        q[r0:r0 + step] = np.clip(np.rint(w / chunk_scales[:, None]), -INT8_MAX, INT8_MAX)
        scales[r0:r0 + step] = chunk_scales
    return q, scales


def column_offsets(q: np.ndarray) -> np.ndarray:
    """int8 [out, in] -> int32 [out]: 128 * each output channel's sum of integers, what the activations' unsigned
    form (q + 128) adds to every dot product, subtracted by the w8a8 kernels."""
    return (UNSIGNED_ZERO * q.sum(axis=1, dtype=np.int64)).astype(np.int32)


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The fp32 weight an int8 one stands for (what the kernels multiply by: q * scale, rounded once)."""
    return q.astype(np.float32) * scales[:, None]
