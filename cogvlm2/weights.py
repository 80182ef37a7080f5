"""CogVLM2 checkpoint I/O: Hugging Face safetensors, MindFormers `.ckpt`, seeded random weights.

Every reader yields `(HF name, array in the stored dtype)` one tensor at a time; `load_weights` validates the
names and shapes against the config before reading any data, then turns each tensor into float32 as it arrives,
so loading peaks at about the final float32 size plus one stored tensor. A `.ckpt` is read whole by MindSpore's
loader first (file bytes, protobuf and Parameters; about twice the file), then released tensor by tensor
(benchmarks/loading.py: peak 1.00x the float32 size for bf16 safetensors, 1.08x for a bf16 `.ckpt`).

MindFormers `.ckpt` names (its `convert_weight.py --modal image`), i = decoder layer, j = vision layer,
e = language | vision, p = weight | bias, n = linear_proj | dense_h_to_4h | gate_proj | dense_4h_to_h:

    Hugging Face                                          MindFormers
    model.embed_tokens.weight                             llm_model.model.tok_embeddings.embedding_weight
    model.norm.weight                                     llm_model.model.norm_out.weight
    lm_head.weight                                        llm_model.lm_head.weight
    model.layers.i.input_layernorm.weight                 llm_model.model.layers.i.input_layernorm.weight
    model.layers.i.post_attention_layernorm.weight        llm_model.model.layers.i.post_attention_layernorm.weight
    model.layers.i.self_attn.e_expert_query_key_value.p   llm_model.model.layers.i.self_attn.e_expert_query_key_value.p
    model.layers.i.self_attn.e_expert_dense.weight        llm_model.model.layers.i.self_attn.e_expert_dense.weight
    model.layers.i.mlp.e_mlp.gate_proj.weight             llm_model.model.layers.i.mlp.e_mlp.w1.weight
    model.layers.i.mlp.e_mlp.up_proj.weight               llm_model.model.layers.i.mlp.e_mlp.w3.weight
    model.layers.i.mlp.e_mlp.down_proj.weight             llm_model.model.layers.i.mlp.e_mlp.w2.weight
    model.layers.0.self_attn.rotary_emb.inv_freq          llm_model.model.freqs_mgr.freqs   (layers > 0: dropped)
    model.vision.patch_embedding.proj.p                   vision_encoder.patch_embed.proj.p
    model.vision.patch_embedding.cls_embedding [1,w]      vision_encoder.cls_token [1,1,w]
    model.vision.patch_embedding.position_embedding.weight [P,w]   vision_encoder.pos_embed [1,P,w]
    model.vision.transformer.layers.j.input_layernorm.weight/bias            vision_encoder.blocks.j.norm1.gamma/beta
    model.vision.transformer.layers.j.post_attention_layernorm.weight/bias   vision_encoder.blocks.j.norm2.gamma/beta
    model.vision.transformer.layers.j.attention.query_key_value.p            vision_encoder.blocks.j.attn.qkv.p
    model.vision.transformer.layers.j.attention.dense.p                      vision_encoder.blocks.j.attn.proj.p
    model.vision.transformer.layers.j.mlp.fc1.p / fc2.p                      vision_encoder.blocks.j.mlp.fc1.p / fc2.p
    model.vision.conv.p                                   mlp_adapter.conv.p
    model.vision.linear_proj.n.weight                     mlp_adapter.linear_proj.n.weight
    model.vision.linear_proj.norm1.weight/bias            mlp_adapter.linear_proj.norm1.gamma/beta
    model.vision.boi / eoi                                mlp_adapter.boi / eoi

Unlike MindFormers' converter, `inv_freq` keeps its stored dtype in a `.ckpt` of any dtype: casting it would
change the RoPE table (bf16 rounding happens iff it is stored in bf16).
"""
from __future__ import annotations

import gc
import json
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes  # also registers numpy's 'bfloat16' dtype, which safetensors' numpy reader needs
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from cogvlm2.config import CogVLM2Config
from cogvlm2.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from cogvlm2.model_source import ModelSource, resolve_model
from cogvlm2.precision import checkpoint_dtype, held_in_storage_dtype, to_storage
from kernels.quantization import Int8Rows

BF16 = np.dtype(ml_dtypes.bfloat16)
FP16 = np.dtype(np.float16)
FP32 = np.dtype(np.float32)
DTYPES = {"bf16": BF16, "fp16": FP16, "fp32": FP32}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
INT8 = np.dtype(np.int8)
SAFETENSORS_DTYPES = {"BF16": BF16, "F16": FP16, "F32": FP32, "I8": INT8}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 10**9  # Hugging Face's max_shard_size="5GB"
INV_FREQ_SUFFIX = ".self_attn.rotary_emb.inv_freq"
INIT_STD = 0.02
MAX_LISTED = 5
GC_EVERY_BYTES = 256 * 2**20
# A quantized checkpoint (`cogvlm2 quantize`) stores each quantized weight "<name>" in int8 and its fp32 per-row
# scales as "<name>_scale"; these keep the source dtype: the embedding table and the vision adapter (cogvlm2/vision.py
# says why), besides the small added tensors (norms, biases, position and cls embeddings, boi/eoi).
SCALE_SUFFIX = "_scale"
UNQUANTIZED_PREFIXES = ("model.embed_tokens.", "model.vision.conv.", "model.vision.linear_proj.")


# ---- the HF tensor list ----------------------------------------------------------------------------------------
def hf_weight_shapes(config: CogVLM2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face CogVLM2 checkpoint of these sizes, in model order, with its shape.
    Includes the per-layer `rotary_emb.inv_freq`, which a checkpoint may omit (see `is_optional_tensor`)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_hidden_layers):
        shapes.update(_decoder_layer_shapes(config, i))
    shapes["model.norm.weight"] = (config.hidden_size,)
    shapes.update(_vision_shapes(config))
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    if config.quantization is not None:
        shapes.update({name + SCALE_SUFFIX: shape[:1] for name, shape in list(shapes.items())
                       if is_quantized_weight(name, shape)})
    return shapes


def is_quantized_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Whether weight quantization applies to this tensor: the projection weights of both experts, the lm_head and
    the vision encoder's patch embedding and transformer linears."""
    return held_in_storage_dtype(name, shape) and not name.startswith(UNQUANTIZED_PREFIXES)


def _decoder_layer_shapes(config: CogVLM2Config, i: int) -> dict[str, tuple[int, ...]]:
    h, inter, p = config.hidden_size, config.intermediate_size, f"model.layers.{i}"
    shapes = {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)}
    for expert in ("language", "vision"):
        shapes[f"{p}.self_attn.{expert}_expert_query_key_value.weight"] = (config.qkv_size, h)
        if expert == "vision":
            shapes[f"{p}.self_attn.vision_expert_query_key_value.bias"] = (config.qkv_size,)
        shapes[f"{p}.self_attn.{expert}_expert_dense.weight"] = (h, config.num_attention_heads * config.head_dim)
        shapes[f"{p}.mlp.{expert}_mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.{expert}_mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.{expert}_mlp.down_proj.weight"] = (h, inter)
    shapes[f"{p}{INV_FREQ_SUFFIX}"] = (config.head_dim // 2,)
    return shapes


def _vision_shapes(config: CogVLM2Config) -> dict[str, tuple[int, ...]]:
    v, h, inter = config.vision, config.hidden_size, config.intermediate_size
    w, pe = v.hidden_size, "model.vision.patch_embedding"
    shapes: dict[str, tuple[int, ...]] = {
        f"{pe}.proj.weight": (w, v.in_channels, v.patch_size, v.patch_size), f"{pe}.proj.bias": (w,),
        f"{pe}.cls_embedding": (1, w), f"{pe}.position_embedding.weight": (v.num_positions, w)}
    for j in range(v.num_hidden_layers):
        p = f"model.vision.transformer.layers.{j}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}.{norm}.weight"] = (w,)
            shapes[f"{p}.{norm}.bias"] = (w,)
        shapes.update({f"{p}.attention.query_key_value.weight": (3 * w, w),
                       f"{p}.attention.query_key_value.bias": (3 * w,),
                       f"{p}.attention.dense.weight": (w, w), f"{p}.attention.dense.bias": (w,),
                       f"{p}.mlp.fc1.weight": (v.intermediate_size, w), f"{p}.mlp.fc1.bias": (v.intermediate_size,),
                       f"{p}.mlp.fc2.weight": (w, v.intermediate_size), f"{p}.mlp.fc2.bias": (w,)})
    lp = "model.vision.linear_proj"
    shapes.update({"model.vision.conv.weight": (w, w, 2, 2), "model.vision.conv.bias": (w,),
                   f"{lp}.linear_proj.weight": (h, w), f"{lp}.norm1.weight": (h,), f"{lp}.norm1.bias": (h,),
                   f"{lp}.dense_h_to_4h.weight": (inter, h), f"{lp}.gate_proj.weight": (inter, h),
                   f"{lp}.dense_4h_to_h.weight": (h, inter),
                   "model.vision.boi": (1, 1, h), "model.vision.eoi": (1, 1, h)})
    return shapes


def is_optional_tensor(name: str) -> bool:
    return name.endswith(INV_FREQ_SUFFIX)


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


# ---- readers ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class CheckpointReader:
    """What a checkpoint holds (HF names, stored shapes and dtypes; known before reading data), a tensor-by-tensor
    iterator over it in the stored dtype and, where the format allows, one tensor by name (`get`)."""
    where: str
    infos: dict[str, TensorInfo]
    read: Callable[[], Iterator[tuple[str, np.ndarray]]]
    get: Callable[[str], np.ndarray] | None = None


def hf_shard_map(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from `model.safetensors.index.json` or a single `model.safetensors`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointNotFoundError(f"checkpoint folder not found: {model_dir}")
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_weight_map(index)
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise CheckpointNotFoundError(f"shard file {model_dir / shard} listed in {index} not found")
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.offset_keys()}
    raise CheckpointNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint folder {model_dir}")


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"'weight_map' in {index} must map tensor names to shard files")
    return weight_map


def _names_by_file(shard_map: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in shard_map.items():
        by_file.setdefault(path, []).append(name)
    return by_file


def _offset_ordered(f: Any, path: Path, names: list[str]) -> list[str]:
    """`names` in file order (sequential reads); each must be in the file."""
    wanted = set(names)
    ordered = [name for name in f.offset_keys() if name in wanted]
    if len(ordered) != len(wanted):
        missing = sorted(wanted.difference(ordered))
        raise CheckpointError(f"tensor(s) {_listed(missing)} listed in the index are missing from {path}")
    return ordered


def hf_tensor_infos(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every tensor of an HF checkpoint, from the safetensors headers only."""
    infos: dict[str, TensorInfo] = {}
    for path, names in _names_by_file(hf_shard_map(model_dir)).items():
        with safe_open(path, framework="numpy") as f:
            for name in _offset_ordered(f, path, names):
                view = f.get_slice(name)
                infos[name] = TensorInfo(tuple(view.get_shape()), _numpy_dtype(name, view.get_dtype(), path))
    return infos


def _numpy_dtype(name: str, safetensors_dtype: str, path: Path) -> np.dtype:
    if safetensors_dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor '{name}' in {path} has unsupported dtype {safetensors_dtype} "
                              f"(expected one of {sorted(SAFETENSORS_DTYPES)})")
    return SAFETENSORS_DTYPES[safetensors_dtype]


def iter_hf_tensors(model_dir: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of an HF checkpoint, one at a time, in the stored dtype (bf16 as
    ml_dtypes.bfloat16)."""
    for path, names in _names_by_file(hf_shard_map(model_dir)).items():
        # pread rather than mmap: touched mmap pages would stay resident for the life of the shard
        with safe_open(path, framework="numpy", backend="pread") as f:
            for name in _offset_ordered(f, path, names):
                yield name, f.get_tensor(name)


def hf_reader(model_dir: str | Path) -> CheckpointReader:
    shards = hf_shard_map(model_dir)

    def get(name: str) -> np.ndarray:
        with safe_open(shards[name], framework="numpy", backend="pread") as f:
            return f.get_tensor(name)

    return CheckpointReader(str(model_dir), hf_tensor_infos(model_dir), lambda: iter_hf_tensors(model_dir), get)


# ---- random weights --------------------------------------------------------------------------------------------
def default_inv_freq(config: CogVLM2Config) -> np.ndarray:
    hd = config.head_dim
    return (1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)


def random_tensor(config: CogVLM2Config, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One tensor of `random_weights`: seeded by (seed, name), so it does not depend on generation order."""
    if name.endswith(INV_FREQ_SUFFIX):
        return default_inv_freq(config)
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if "norm" in name.split(".")[-2]:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= INIT_STD
    return values


def random_weights(config: CogVLM2Config, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Deterministic weights, one tensor at a time: normal(0, 0.02) for matrices and embeddings, ones for norm
    weights, zeros for biases, the standard inv_freq (float32); stored in the preset's param_init_type, as a real
    checkpoint of that dtype would be."""
    stored = checkpoint_dtype(config)
    for name, shape in hf_weight_shapes(config).items():
        value = random_tensor(config, name, shape, seed)
        yield name, value if name.endswith(INV_FREQ_SUFFIX) else value.astype(stored)


def random_reader(config: CogVLM2Config, seed: int) -> CheckpointReader:
    infos = {name: TensorInfo(shape, FP32 if name.endswith(INV_FREQ_SUFFIX) else checkpoint_dtype(config))
             for name, shape in hf_weight_shapes(config).items()}
    def get(name: str) -> np.ndarray:
        value = random_tensor(config, name, infos[name].shape, seed)
        return value if name.endswith(INV_FREQ_SUFFIX) else value.astype(infos[name].dtype)

    return CheckpointReader(f"random weights (seed {seed})", infos, lambda: random_weights(config, seed), get)


# ---- MindFormers names ---------------------------------------------------------------------------------------
_PLACEHOLDERS = {"i": r"\d+", "j": r"\d+", "e": "language|vision", "p": "weight|bias",
                 "n": "linear_proj|dense_h_to_4h|gate_proj|dense_4h_to_h"}
_LLM = "llm_model.model.layers.{i}"
_VIT = "model.vision.transformer.layers.{j}"
_NAME_TABLE: list[tuple[str, str]] = [  # (Hugging Face, MindFormers); the module docstring shows it as a table
    ("model.embed_tokens.weight", "llm_model.model.tok_embeddings.embedding_weight"),
    ("model.norm.weight", "llm_model.model.norm_out.weight"),
    ("lm_head.weight", "llm_model.lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", f"{_LLM}.input_layernorm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", f"{_LLM}.post_attention_layernorm.weight"),
    ("model.layers.{i}.self_attn.{e}_expert_query_key_value.{p}",
     f"{_LLM}.self_attn.{{e}}_expert_query_key_value.{{p}}"),
    ("model.layers.{i}.self_attn.{e}_expert_dense.weight", f"{_LLM}.self_attn.{{e}}_expert_dense.weight"),
    ("model.layers.{i}.mlp.{e}_mlp.gate_proj.weight", f"{_LLM}.mlp.{{e}}_mlp.w1.weight"),
    ("model.layers.{i}.mlp.{e}_mlp.up_proj.weight", f"{_LLM}.mlp.{{e}}_mlp.w3.weight"),
    ("model.layers.{i}.mlp.{e}_mlp.down_proj.weight", f"{_LLM}.mlp.{{e}}_mlp.w2.weight"),
    ("model.layers.0" + INV_FREQ_SUFFIX, "llm_model.model.freqs_mgr.freqs"),
    ("model.vision.patch_embedding.proj.{p}", "vision_encoder.patch_embed.proj.{p}"),
    ("model.vision.patch_embedding.cls_embedding", "vision_encoder.cls_token"),
    ("model.vision.patch_embedding.position_embedding.weight", "vision_encoder.pos_embed"),
    (f"{_VIT}.input_layernorm.weight", "vision_encoder.blocks.{j}.norm1.gamma"),
    (f"{_VIT}.input_layernorm.bias", "vision_encoder.blocks.{j}.norm1.beta"),
    (f"{_VIT}.post_attention_layernorm.weight", "vision_encoder.blocks.{j}.norm2.gamma"),
    (f"{_VIT}.post_attention_layernorm.bias", "vision_encoder.blocks.{j}.norm2.beta"),
    (f"{_VIT}.attention.query_key_value.{{p}}", "vision_encoder.blocks.{j}.attn.qkv.{p}"),
    (f"{_VIT}.attention.dense.{{p}}", "vision_encoder.blocks.{j}.attn.proj.{p}"),
    (f"{_VIT}.mlp.fc1.{{p}}", "vision_encoder.blocks.{j}.mlp.fc1.{p}"),
    (f"{_VIT}.mlp.fc2.{{p}}", "vision_encoder.blocks.{j}.mlp.fc2.{p}"),
    ("model.vision.conv.{p}", "mlp_adapter.conv.{p}"),
    ("model.vision.linear_proj.{n}.weight", "mlp_adapter.linear_proj.{n}.weight"),
    ("model.vision.linear_proj.norm1.weight", "mlp_adapter.linear_proj.norm1.gamma"),
    ("model.vision.linear_proj.norm1.bias", "mlp_adapter.linear_proj.norm1.beta"),
    ("model.vision.boi", "mlp_adapter.boi"),
    ("model.vision.eoi", "mlp_adapter.eoi"),
]
# HF tensors that MindFormers stores with an extra leading dimension of 1
_MINDFORMERS_UNSQUEEZED = {"model.vision.patch_embedding.cls_embedding",
                           "model.vision.patch_embedding.position_embedding.weight"}


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{([a-z])\}", template)
    # odd positions are placeholder names, even ones literal text
    pattern = "".join(f"(?P<{part}>{_PLACEHOLDERS[part]})" if k % 2 else re.escape(part)
                      for k, part in enumerate(parts))
    return re.compile(pattern)


_HF_TO_MF = [(_template_regex(hf), mf) for hf, mf in _NAME_TABLE]
_MF_TO_HF = [(_template_regex(mf), hf) for hf, mf in _NAME_TABLE]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    return None


def hf_to_mindformers(name: str) -> str | None:
    """The MindFormers name of an HF tensor; None when MindFormers does not store it (inv_freq of layers > 0)."""
    return _rename(name, _HF_TO_MF)


def mindformers_to_hf(name: str) -> str | None:
    """The HF name of a MindFormers tensor; None for a name outside the table."""
    return _rename(name, _MF_TO_HF)


def to_mindformers_array(hf_name: str, array: np.ndarray) -> np.ndarray:
    return array[None] if hf_name in _MINDFORMERS_UNSQUEEZED else array


def from_mindformers_shape(hf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if hf_name in _MINDFORMERS_UNSQUEEZED and shape[:1] == (1,):
        return shape[1:]
    return shape


# ---- MindFormers .ckpt -----------------------------------------------------------------------------------------
def _mindspore_dtypes() -> dict[Any, np.dtype]:
    from mindspore import dtype as mstype
    return {mstype.bfloat16: BF16, mstype.float16: FP16, mstype.float32: FP32}


def mindformers_reader(ckpt_path: str | Path) -> CheckpointReader:
    """A MindFormers `.ckpt` under HF names. MindSpore's loader parses the whole file into Parameters; they are
    released one by one as the iterator hands them out."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {ckpt_path}")
    import mindspore  # imported here: it takes a second and HF loading does not need it

    try:
        params = mindspore.load_checkpoint(str(ckpt_path))
    except ValueError as e:
        raise CheckpointError(f"cannot read MindFormers checkpoint {ckpt_path}: {e}") from e
    to_numpy_dtype = _mindspore_dtypes()
    hf_names: dict[str, str] = {}  # MindFormers name -> HF name (or the MindFormers name when outside the table)
    infos: dict[str, TensorInfo] = {}
    for mf_name, param in params.items():
        if isinstance(param, str):  # save_checkpoint's append_dict entries
            continue
        if param.dtype not in to_numpy_dtype:
            raise CheckpointError(f"tensor '{mf_name}' in {ckpt_path} has unsupported dtype {param.dtype}")
        hf_name = mindformers_to_hf(mf_name) or mf_name
        hf_names[mf_name] = hf_name
        infos[hf_name] = TensorInfo(from_mindformers_shape(hf_name, tuple(param.shape)), to_numpy_dtype[param.dtype])

    def read() -> Iterator[tuple[str, np.ndarray]]:
        released = 0
        for mf_name, hf_name in hf_names.items():
            array = params.pop(mf_name).asnumpy()  # zero-copy view that keeps the Parameter's memory alive
            released += array.nbytes
            yield hf_name, array.reshape(infos[hf_name].shape)
            del array
            # a Parameter sits in a reference cycle: only the cycle collector frees it, and a full collection
            # costs ~0.1 s, so collect once per GC_EVERY_BYTES handed out
            if released >= GC_EVERY_BYTES:
                gc.collect()
                released = 0
        gc.collect()

    return CheckpointReader(str(ckpt_path), infos, read)


def write_mindformers_ckpt(hf_model_dir_or_source: str | Path | ModelSource, out_path: str | Path,
                           dtype: str = "bf16", progress: bool = True) -> Path:
    """Convert a checkpoint (HF folder, preset name, or any ModelSource) to a MindFormers `.ckpt` with
    mindspore.save_checkpoint. Writes a config.json beside it when none is there, so `--model OUT.ckpt` works.
    The whole model is held once in `dtype` while writing (save_checkpoint takes one list of tensors)."""
    import mindspore
    from mindspore import Tensor

    target = _parse_dtype(dtype)
    out_path = Path(out_path)
    if out_path.suffix != ".ckpt":
        raise ConfigError(f"output path must end with .ckpt, got {out_path}")
    source = hf_model_dir_or_source
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    reader = open_checkpoint(source)
    expected = validate_tensor_infos(reader.infos, hf_weight_shapes(source.config), reader.where)
    entries = []
    for name, array in tqdm(reader.read(), total=len(reader.infos), desc="converting", unit="tensor",
                            disable=None if progress else True):
        mf_name = hf_to_mindformers(name) if name in expected else None
        if mf_name is None:
            continue
        if not is_optional_tensor(name):
            array = to_storage(array, target)
        entries.append({"name": mf_name, "data": Tensor(np.ascontiguousarray(to_mindformers_array(name, array)))})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mindspore.save_checkpoint(entries, str(out_path))
    config_json = out_path.parent / "config.json"
    if not config_json.exists():
        _write_config_json(source.config.to_hf_dict(), config_json)
    return out_path


def _parse_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ---- validation and loading ------------------------------------------------------------------------------------
def validate_tensor_infos(infos: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], where: str) -> set[str]:
    """Raise on missing tensors or wrong shapes, warn on unexpected ones; returns the expected names present."""
    missing = [name for name in expected if name not in infos and not is_optional_tensor(name)]
    if missing:
        raise CheckpointError(f"checkpoint {where} is missing {len(missing)} tensor(s): {_listed(missing)}")
    wrong = [f"'{name}' has shape {infos[name].shape}, expected {expected[name]}"
             for name in expected if name in infos and infos[name].shape != expected[name]]
    if wrong:
        raise CheckpointError(f"checkpoint {where} does not match the config: tensor {_listed(wrong, quote=False)}")
    extra = [name for name in infos if name not in expected]
    if extra:
        warnings.warn(f"checkpoint {where} has {len(extra)} unexpected tensor(s), ignored: {_listed(extra)}",
                      stacklevel=3)
    return set(expected).intersection(infos)


def _listed(items: list[str], quote: bool = True) -> str:
    shown = [f"'{item}'" if quote else item for item in items[:MAX_LISTED]]
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(shown) + more


def open_checkpoint(source: ModelSource) -> CheckpointReader:
    """The reader for a ModelSource: seeded random weights, an HF folder, or a MindFormers `.ckpt` file."""
    checkpoint = source.checkpoint
    if checkpoint is None:
        return random_reader(source.config, source.random_seed)
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".ckpt":
        return mindformers_reader(checkpoint)
    if checkpoint.is_file():
        raise CheckpointError(f"unsupported checkpoint file {checkpoint}: expected a Hugging Face checkpoint folder "
                              f"or a MindFormers .ckpt file")
    return hf_reader(checkpoint)


@dataclass
class LoadedWeights:
    """Tensors under HF names and shapes (inv_freq excluded), layer 0's inv_freq in its stored dtype."""
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    inv_freq: np.ndarray | None = None
    source_dtype: str = "float32"


def load_weights(source: ModelSource, consume: Callable[[str, np.ndarray], None] | None = None,
                 progress: bool = True, storage: np.dtype | None = FP32) -> LoadedWeights:
    """Validate the checkpoint against `source.config`, then read it tensor by tensor into `storage` (None: each
    tensor in the dtype it is stored in; see cogvlm2/precision.py). With `consume`, each tensor is handed over as
    it arrives and not kept (`tensors` stays empty), so the caller can turn it into a Parameter and peak memory
    stays near the model's final size."""
    reader = open_checkpoint(source)
    expected, inv_freq_names = _validated(reader, source)
    weights = LoadedWeights(source_dtype=_source_dtype(reader.infos, expected))
    for name, array in _expected_tensors(reader, expected, progress):
        if is_optional_tensor(name):
            if name == inv_freq_names[0]:
                weights.inv_freq = array
            continue
        value = array if isinstance(array, Int8Rows) else to_storage(array, storage)
        del array
        if consume is None:
            weights.tensors[name] = value
        else:
            consume(name, value)
    return weights


def checkpoint_tensors(source: ModelSource, progress: bool = True) -> Iterator[tuple[str, np.ndarray | Int8Rows]]:
    """The checkpoint, once validated against `source.config`, one expected tensor at a time in the stored dtype
    (quantized weights as Int8Rows; every layer's inv_freq included)."""
    reader = open_checkpoint(source)
    expected, _ = _validated(reader, source)
    yield from _expected_tensors(reader, expected, progress)


def _expected_tensors(reader: CheckpointReader, expected: set[str], progress: bool
                      ) -> Iterator[tuple[str, np.ndarray | Int8Rows]]:
    stream = tqdm(reader.read(), total=len(reader.infos), desc="loading weights", unit="tensor",
                  disable=None if progress else True)
    return _with_scales((item for item in stream if item[0] in expected), reader.infos)


def _with_scales(stream: Iterator[tuple[str, np.ndarray]], infos: dict[str, TensorInfo]
                 ) -> Iterator[tuple[str, np.ndarray | Int8Rows]]:
    """The stream with each quantized weight and its scales (in either order) joined into one Int8Rows."""
    held: dict[str, np.ndarray] = {}
    for name, array in stream:
        values_name = name.removesuffix(SCALE_SUFFIX)
        if values_name + SCALE_SUFFIX not in infos:
            yield name, array
        elif values_name in held:
            other = held.pop(values_name)
            values, scales = (other, array) if name != values_name else (array, other)
            yield values_name, Int8Rows(values, scales)
        else:
            held[values_name] = array


def _validated(reader: CheckpointReader, source: ModelSource) -> tuple[set[str], list[str]]:
    """The checkpoint's tensors checked against the config: the expected names, and the inv_freq ones by layer."""
    expected = validate_tensor_infos(reader.infos, hf_weight_shapes(source.config), reader.where)
    _check_quantized_dtypes(reader.infos, expected, reader.where)
    return expected, sorted((name for name in expected if is_optional_tensor(name)), key=_layer_of)


def _check_quantized_dtypes(infos: dict[str, TensorInfo], expected: set[str], where: str) -> None:
    """int8 exactly where a scale accompanies the tensor, and fp32 scales."""
    for name in expected:
        scaled = name + SCALE_SUFFIX in expected
        if (infos[name].dtype == INT8) != scaled:
            raise CheckpointError(f"checkpoint {where}: tensor '{name}' is {infos[name].dtype}, expected "
                                  + ("int8 (its config states a quantization)" if scaled else
                                     "a float dtype (int8 weights need config.json's quantization_config)"))
        if name.endswith(SCALE_SUFFIX) and infos[name].dtype != FP32:
            raise CheckpointError(f"checkpoint {where}: scales '{name}' are {infos[name].dtype}, expected float32")


class LazyTensors(Mapping):
    """The checkpoint's tensors (inv_freq excluded) read one at a time when the model asks for them and not kept,
    in `storage`: a model built from it holds its prepared weights plus one checkpoint tensor at a time (with a
    quantizing kernel set, never a 16- or 32-bit copy of the model)."""

    def __init__(self, reader: CheckpointReader, names: list[str], storage: np.dtype | None, progress: bool):
        self._reader, self._names, self._storage = reader, names, storage
        self._known = set(names)
        self._scaled = {name for name in names if name + SCALE_SUFFIX in reader.infos}
        self._bar = tqdm(total=len(names), desc="loading weights", unit="tensor", disable=None if progress else True)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        self._bar.update(1)
        if name in self._scaled:
            return Int8Rows(self._reader.get(name), self._reader.get(name + SCALE_SUFFIX))
        return to_storage(self._reader.get(name), self._storage)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.infos[name].shape


def tensor_shape(tensors: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """A tensor's shape without reading a lazy one."""
    return tensors.shape(name) if isinstance(tensors, LazyTensors) else tuple(tensors[name].shape)


def lazy_weights(source: ModelSource, progress: bool = True, storage: np.dtype | None = FP32) -> LoadedWeights | None:
    """load_weights' validation and result, with `tensors` a LazyTensors; None where the format has no random
    access (a MindFormers .ckpt): then load_weights reads it whole."""
    reader = open_checkpoint(source)
    if reader.get is None:
        return None
    expected, inv_freq_names = _validated(reader, source)
    names = [name for name in reader.infos
             if name in expected and not is_optional_tensor(name) and not name.endswith(SCALE_SUFFIX)]
    return LoadedWeights(LazyTensors(reader, names, storage, progress),
                         reader.get(inv_freq_names[0]) if inv_freq_names else None,
                         _source_dtype(reader.infos, expected))


def _source_dtype(infos: dict[str, TensorInfo], names: set[str]) -> str:
    dtypes = sorted({infos[name].dtype.name for name in names if not is_optional_tensor(name)})
    return "+".join(dtypes)


# ---- writing HF checkpoints ------------------------------------------------------------------------------------
def save_hf_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path,
                       hf_config: dict[str, Any] | None = None, shard_size_bytes: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write tensors (kept in their dtypes) as an HF checkpoint: `model.safetensors`, or shards plus
    `model.safetensors.index.json` when they exceed `shard_size_bytes`; only one shard is held in memory."""
    out_dir = Path(out_dir)
    if (out_dir / INDEX_FILE).exists() or any(out_dir.glob("*.safetensors")):
        raise CheckpointError(f"{out_dir} already holds a checkpoint; choose an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # the shard count is known only at the end, so shards get their final names afterwards
    parts: list[tuple[Path, list[str]]] = []
    total_size = 0
    shard: dict[str, np.ndarray] = {}
    shard_size = 0
    for name, array in tensors:
        if shard and shard_size + array.nbytes > shard_size_bytes:
            parts.append(_write_part(shard, out_dir, len(parts)))
            shard, shard_size = {}, 0
        shard[name] = np.ascontiguousarray(array)
        shard_size += array.nbytes
        total_size += array.nbytes
    parts.append(_write_part(shard, out_dir, len(parts)))
    _name_shards(parts, out_dir, total_size)
    if hf_config is not None:
        _write_config_json(hf_config, out_dir / "config.json")
    return out_dir


def _write_part(shard: dict[str, np.ndarray], out_dir: Path, k: int) -> tuple[Path, list[str]]:
    path = out_dir / f"part-{k:05d}.tmp"
    save_file(shard, path, metadata={"format": "pt"})
    return path, list(shard)


def _name_shards(parts: list[tuple[Path, list[str]]], out_dir: Path, total_size: int) -> None:
    if len(parts) == 1:
        parts[0][0].rename(out_dir / SINGLE_FILE)
        return
    weight_map: dict[str, str] = {}
    for k, (path, names) in enumerate(parts):
        shard_name = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        path.rename(out_dir / shard_name)
        weight_map.update({name: shard_name for name in names})
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(out_dir / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def _write_config_json(hf_config: dict[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)


def make_random_checkpoint(config: CogVLM2Config, out_dir: str | Path, seed: int = 0, dtype: str = "bf16",
                           shard_size_bytes: int = DEFAULT_SHARD_SIZE) -> Path:
    """An HF-layout checkpoint of `random_weights(config, seed)` cast to `dtype` (inv_freq stays float32)."""
    target = _parse_dtype(dtype)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
    tensors = ((name, array if is_optional_tensor(name) else to_storage(array, target))
               for name, array in random_weights(config, seed))
    return save_hf_checkpoint(tensors, out_dir, hf_config, shard_size_bytes)
