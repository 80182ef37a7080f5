"""What the model needs from a kernel set: the engine's hot ops, the same on every backend (kernels.registry builds
the concrete ones), so the model never branches on where a kernel comes from."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from mindspore import Tensor


@runtime_checkable
class KernelSet(Protocol):
    def rope(self, q: Tensor, k: Tensor, positions, cos_table: Tensor, sin_table: Tensor) -> tuple[Tensor, Tensor]:
        """q [N, H, d] and k [N, KV, d] rotated (NeoX rotate-half) by the table rows at `positions`. A backend may
        rotate in place: use the returned tensors."""
        ...

    def write_kv(self, cache: Tensor, slot_mapping, values: Tensor) -> Tensor | None:
        """values [N, KV, d] (fp32) into cache [num_slots, KV, d] at slot_mapping [N], in place. A cache holds
        float32, bfloat16 or float16 (kernels.reference.CACHE_DTYPES), its tensor's dtype: 16-bit caches are
        rounded to nearest even on write and read back widened to fp32."""
        ...

    def paged_attention(self, q: Tensor, k_new: Tensor | None, v_new: Tensor | None, key_cache: Tensor,
                        value_cache: Tensor, slot_mapping, seq_index, token_position, block_tables, context_lens,
                        block_size: int, rope: tuple | None = None) -> Tensor:
        """Writes k_new/v_new at slot_mapping (as write_kv does; both caches of one dtype), then attends -> [N, H * d]
        fp32. rope=(positions, cos_table, sin_table) rotates q and k_new first (by position id, which differs from
        token_position after an image): the fused form. k_new = v_new = None: q is the layer's QKV projection
        [N, H + 2 KV, d] (q heads, k heads, v heads)."""
        ...

    def expert_linear(self, x: Tensor, num_language: int, wl: Tensor, wv: Tensor, bv: Tensor | None,
                      residual: Tensor | None = None) -> Tensor:
        """x in routed order: rows [:num_language] @ wl^T, the rest @ wv^T + bv (weights from prepare_weight);
        with residual [N, out] (then bv is None), residual + those products."""
        ...

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x [N, d] fp32 * rsqrt(mean(x^2) + eps) * weight [d]."""
        ...

    def swiglu(self, gate_up: Tensor) -> Tensor:
        """silu(gate) * up of the stacked [N, 2 F] gate/up projection (gate first) -> [N, F]."""
        ...

    def gelu(self, x: Tensor) -> Tensor:
        """The exact GELU of x [N, F] fp32 (the vision encoder's MLP and adapter) -> [N, F]."""
        ...

    def linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [N, in] @ w^T (+ bias) for a weight from prepare_weight: the lm_head, the vision encoder."""
        ...

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_elements: int) -> tuple[int, ...]:
        """One layer's K (or V) cache shape as this backend's kernels read it: [num_slots, KV, head_elements] here,
        the Ascend built-ins' [num_blocks, block_size, KV, d] or its NZ form (kernels/ascend.py)."""
        ...

    def place_kv_cache(self, cache):
        """The allocated cache Parameter as the kernels read it (310P's built-ins: cast to FRACTAL_NZ)."""
        ...

    def prepare_weight(self, weight: np.ndarray, quantize: bool = True) -> Tensor:
        """A projection weight [out, in] in the layout this backend's expert_linear and linear read (done once, at
        load time); with the set's quantization (kernels/quantization.py) an int8 QuantizedWeight, unless
        `quantize` is False."""
        ...
