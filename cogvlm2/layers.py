"""Small MindSpore building blocks of the vision encoder and the language model (fp32 on CPU).

The math the kernels layer also needs (linear, split_qkv, softmax_attention, expert_linear, apply_rope, rms_norm,
swiglu, to_tensor)
is defined in kernels/composites.py and re-exported here; what is left is the model's own."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

from kernels.composites import (apply_rope, expert_linear, linear, rms_norm, softmax_attention, split_qkv, swiglu,
                                to_tensor)

__all__ = ["apply_rope", "expert_linear", "fp32_tensor", "layer_norm", "linear", "rms_norm", "softmax_attention",
           "split_qkv", "swiglu", "to_tensor"]


def fp32_tensor(array: np.ndarray) -> Tensor:
    """A float32 Tensor of a small tensor that is added rather than multiplied (norm weights, biases, embeddings
    added to activations): widened once at load (cogvlm2/precision.py); zero-copy when it is float32 already."""
    return Tensor.from_numpy(np.ascontiguousarray(array, np.float32))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)(x, weight, bias)[0]
