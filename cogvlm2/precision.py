"""`dtype` and `kv_cache_dtype`: how weights are stored, how the GEMMs compute, how K/V are cached.

- float32: float32 math; weights stay in the checkpoint's bf16/fp16 (widening is exact), a float32 checkpoint stays
  float32; KV float32.
- bfloat16: weights in bf16, GEMM inputs rounded to bf16 with float32 accumulation; KV bf16. Norms, softmax,
  residual adds, RoPE and sampling stay float32.
- float16: the same with fp16 weights and KV (for SKUs without bf16; widened on a CPU).
- auto: a MindFormers yaml's compute_dtype when it states one; else bfloat16 where the CPU has bf16 dot products
  and the checkpoint is bf16; else float32. On an Ascend NPU: bfloat16 on 910B, float16 on 310P (which has no
  bf16; a yaml's bfloat16 becomes float16 there), whatever the checkpoint; the weights are cast to it at load and
  the KV cache holds it (the Ascend kernels compute in bf16/fp16 only: kernels/ascend.py).
Small tensors that are added rather than multiplied (norm weights, biases, position and cls embeddings, boi/eoi)
are held in float32 whatever the dtype: they are ~0.1% of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from cogvlm2.config import CogVLM2Config
from kernels.ascend import check_ascend_precision
from kernels.device import Device, select_device

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
KV_NUMPY_DTYPES = {**NUMPY_DTYPES, "int8": np.dtype(np.int8)}  # int8: with per-token, per-head scales (kernels)


@dataclass(frozen=True)
class Precision:
    compute: str       # "float32" | "bfloat16" | "float16": what the GEMMs compute in
    weights: np.dtype  # storage of the GEMM weights and the embedding table
    kv_cache: str      # "float32" | "bfloat16" | "float16" | "int8"

    @property
    def kv_bytes(self) -> int:
        """Bytes per cached K or V value (int8's scales aside)."""
        return KV_NUMPY_DTYPES[self.kv_cache].itemsize


def resolve_precision(dtype: str, kv_cache_dtype: str, config: CogVLM2Config, checkpoint_dtype: np.dtype,
                      cpu_has_bf16_dot: bool, device: str | Device = "cpu") -> Precision:
    """`device`: a kernels.device name ('auto', 'cpu', 'ascend') or the Device itself."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    device = select_device(device) if isinstance(device, str) else device
    if device.target == "ascend":
        return _ascend_precision(dtype, kv_cache_dtype, config, device)
    compute = _auto(config, checkpoint_dtype, cpu_has_bf16_dot) if dtype == "auto" else dtype
    kv = compute if kv_cache_dtype == "auto" else kv_cache_dtype
    return Precision(compute, weight_storage(compute, checkpoint_dtype), kv)


def _ascend_precision(dtype: str, kv_cache_dtype: str, config: CogVLM2Config, device: Device) -> Precision:
    compute = dtype
    if dtype == "auto":
        compute = "bfloat16" if device.supports_bf16 else "float16"
        if config.compute_dtype == "float16":
            compute = "float16"
    check_ascend_precision(compute, None, device.soc_family)
    kv = compute if kv_cache_dtype == "auto" else kv_cache_dtype
    if kv != compute:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} on Ascend: the cache holds the compute dtype "
                         f"({compute}; kv_cache_dtype='auto')")
    return Precision(compute, NUMPY_DTYPES[compute], kv)


def _auto(config: CogVLM2Config, checkpoint_dtype: np.dtype, cpu_has_bf16_dot: bool) -> str:
    if config.compute_dtype in NUMPY_DTYPES:
        return config.compute_dtype
    if checkpoint_dtype == NUMPY_DTYPES["bfloat16"] and cpu_has_bf16_dot:
        return "bfloat16"
    return "float32"


def weight_storage(compute: str, checkpoint_dtype: np.dtype) -> np.dtype:
    """float32 math keeps 16-bit checkpoints as they are (exact); 16-bit math stores its own dtype."""
    if compute == "float32":
        return checkpoint_dtype if checkpoint_dtype in (NUMPY_DTYPES["bfloat16"], NUMPY_DTYPES["float16"]) \
            else NUMPY_DTYPES["float32"]
    return NUMPY_DTYPES[compute]


def to_storage(array: np.ndarray, storage: np.dtype | None) -> np.ndarray:
    """One tensor in the storage dtype (None: as it is): exact when widening, round to nearest even when narrowing
    (bf16 <-> fp16 goes through float32, which holds both exactly)."""
    array = _canonical(array)
    if storage is None or array.dtype == storage:
        return array
    if array.dtype != np.float32 and storage != np.float32:
        array = array.astype(np.float32)
    return array.astype(storage)


def _canonical(array: np.ndarray) -> np.ndarray:
    """bf16 arrays under ml_dtypes' one dtype object: a reader's bfloat16 (safetensors') can be a distinct, unequal
    dtype instance, which the kernels' dtype checks would not recognise."""
    if array.dtype.name == "bfloat16" and array.dtype != NUMPY_DTYPES["bfloat16"]:
        return array.view(NUMPY_DTYPES["bfloat16"])
    return array


def as_float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, np.float32)


def checkpoint_dtype(config: CogVLM2Config) -> np.dtype:
    """The checkpoint's dtype as its config states it (config.json's torch_dtype, a yaml's param_init_type)."""
    return NUMPY_DTYPES.get(config.torch_dtype, NUMPY_DTYPES["float32"])


def held_in_storage_dtype(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the model holds this checkpoint tensor in the storage dtype (the GEMM weights, as panels, and the
    embedding table) rather than in float32 (norms, biases, the position and cls embeddings, boi/eoi)."""
    return name.endswith(".weight") and len(shape) >= 2 and "position_embedding" not in name and "norm" not in name
