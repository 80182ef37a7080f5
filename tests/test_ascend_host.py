"""The Ascend execution path's host logic, on this CPU: device and dtype selection under a faked SKU, the kernel
sets' primitives (argument layout against MindSpore 2.10's own op definitions, results against
kernels/reference.py through NumPy models of the kernels: tests/ascend_standin.py), the FRACTAL_NZ layout, and
the tensor-parallel launch environment. What only an NPU can show is in tests/test_ascend_npu.py."""
from __future__ import annotations

import dataclasses
import logging
import math

import ml_dtypes
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from ascend_standin import StandInPrimitives, custom_declaration
from cogvlm2.config import CogVLM2Config
from cogvlm2.precision import NUMPY_DTYPES, resolve_precision
from kernels import ascend, ascend_build, device as device_mod, registry, runtime, sku
from kernels.ascend import AscendKernels, sequence_layout
from kernels.device import CPU, Device, DeviceUnavailableError, NpuProbe, launch_env, resolve_device, select_device
from kernels.nz import C0, FORMAT_NZ, nd_to_nz, nz_cache_shape, nz_offset, nz_shape, nz_to_nd

BF16, FP16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
NO_PLUGIN = NpuProbe(False, "Load dynamic library: libmindspore_ascend.so.2 failed. libge_runner.so: cannot open")
EIGHT_NPUS = NpuProbe(True, "", 8)
A910B, A310P = Device("ascend", 0, 0, "ascend-910b1"), Device("ascend", 0, 0, "ascend-310p3")
TOLERANCE = {"bfloat16": 4e-2, "float16": 6e-3}  # attention outputs against the fp32 reference, max abs


@pytest.fixture
def fresh_selection():
    """Device and SKU detection forgotten before and after (both are cached per process)."""
    for cached in (select_device, sku.detect_sku_info, registry._kernels):
        cached.cache_clear()
    yield
    for cached in (select_device, sku.detect_sku_info, registry._kernels):
        cached.cache_clear()


@pytest.fixture
def fake_ascend(monkeypatch, fresh_selection):
    """This process as an Ascend host of `sku_id` with 8 NPUs: MindSpore stays on the CPU, the NPU's primitives
    are the stand-in's."""
    def install(sku_id: str = "ascend-910b1") -> StandInPrimitives:
        monkeypatch.setenv(sku.SKU_ENV, sku_id)
        monkeypatch.setattr(device_mod, "probe_npu", lambda: EIGHT_NPUS)
        monkeypatch.setattr(runtime, "_configured", None)
        monkeypatch.setattr(runtime, "_configure_ascend", lambda mindspore, device: None)
        primitives = StandInPrimitives()
        monkeypatch.setattr(ascend, "AscendPrimitives", lambda: primitives)
        return primitives
    return install


# ---- device selection
def test_auto_is_the_cpu_without_an_npu_and_ascend_names_what_is_missing():
    assert resolve_device("auto", NO_PLUGIN, {}, "cpu-amd-epyc-avx512") == CPU
    assert resolve_device("cpu", EIGHT_NPUS, {}, "ascend-910b1") == CPU
    with pytest.raises(DeviceUnavailableError, match="libge_runner.so.*CANN"):
        resolve_device("ascend", NO_PLUGIN, {}, "cpu-amd-epyc-avx512")
    with pytest.raises(DeviceUnavailableError, match="0 devices.*npu-smi"):
        resolve_device("ascend", NpuProbe(True, "", 0), {}, "ascend-910b1")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("npu", EIGHT_NPUS, {}, "ascend-910b1")


def test_device_id_is_the_local_rank_and_respects_visible_devices():
    assert resolve_device("auto", EIGHT_NPUS, {}, "ascend-910b1") == A910B
    assert resolve_device("ascend", EIGHT_NPUS, {"DEVICE_ID": "3"}, "ascend-910b1") == Device("ascend", 3, 3,
                                                                                              "ascend-910b1")
    visible = {"DEVICE_ID": "1", "ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"}
    assert resolve_device("ascend", EIGHT_NPUS, visible, "ascend-910b1") == Device("ascend", 1, 5, "ascend-910b1")
    with pytest.raises(DeviceUnavailableError, match="local rank 2.*ASCEND_RT_VISIBLE_DEVICES=4,5"):
        resolve_device("ascend", EIGHT_NPUS, {"DEVICE_ID": "2", "ASCEND_RT_VISIBLE_DEVICES": "4,5"}, "ascend-910b1")
    with pytest.raises(ValueError, match="ASCEND_RT_VISIBLE_DEVICES"):
        resolve_device("ascend", EIGHT_NPUS, {"ASCEND_RT_VISIBLE_DEVICES": "0,x"}, "ascend-910b1")


def test_soc_families_and_bf16():
    assert (A910B.soc_family, A910B.supports_bf16) == ("910b", True)
    assert (A310P.soc_family, A310P.supports_bf16) == ("310p", False)
    assert A910B.mindspore_target == "Ascend" and CPU.mindspore_target == "CPU"


def test_this_machine_selects_the_cpu_once_and_refuses_ascend(fresh_selection, caplog):
    with caplog.at_level(logging.INFO, logger="cogvlm2.device"):
        assert select_device("auto") == CPU and select_device("auto") == CPU
    said = [r.getMessage() for r in caplog.records if r.name == "cogvlm2.device"]
    assert said == ["cogvlm2: device='auto' runs on CPU (MindSpore reports no Ascend NPU)"]
    with pytest.raises(DeviceUnavailableError, match="device='ascend' needs an Ascend NPU.*Ascend plugin"):
        select_device("ascend")


def test_llm_device_ascend_fails_here_naming_what_is_missing(fresh_selection):
    from engine import LLM
    with pytest.raises(DeviceUnavailableError, match="Ascend plugin"):
        LLM("demo", device="ascend")
    with pytest.raises(ValueError, match="device must be one of"):
        LLM("demo", device="gpu")


def test_a_faked_sku_selects_its_ascend_device(fake_ascend):
    fake_ascend("ascend-310p3")
    assert select_device("auto") == A310P


# ---- dtype per SoC
def test_auto_dtype_is_bf16_on_910b_and_fp16_on_310p_with_weights_cast_at_load():
    config = CogVLM2Config()
    for checkpoint in (BF16, np.dtype(np.float32)):
        p = resolve_precision("auto", "auto", config, checkpoint, False, A910B)
        assert (p.compute, p.weights, p.kv_cache) == ("bfloat16", BF16, "bfloat16")
        p = resolve_precision("auto", "auto", config, checkpoint, True, A310P)
        assert (p.compute, p.weights, p.kv_cache) == ("float16", FP16, "float16")
    yaml_bf16 = dataclasses.replace(config, compute_dtype="bfloat16")
    assert resolve_precision("auto", "auto", yaml_bf16, BF16, True, A310P).compute == "float16"
    yaml_fp16 = dataclasses.replace(config, compute_dtype="float16")
    assert resolve_precision("auto", "auto", yaml_fp16, BF16, True, A910B).compute == "float16"
    assert resolve_precision("auto", "auto", config, BF16, True, CPU).compute == "bfloat16"  # CPU rule unchanged


@pytest.mark.parametrize("dtype, kv, device, match", [
    ("bfloat16", "auto", A310P, "310P has no bf16"), ("float32", "auto", A910B, "dtype 'float32' on Ascend"),
    ("auto", "int8", A910B, "kv_cache_dtype 'int8' on Ascend"), ("auto", "float32", A310P, "kv_cache_dtype")])
def test_dtypes_an_ascend_device_refuses_name_the_field(dtype, kv, device, match):
    with pytest.raises(ValueError, match=match):
        resolve_precision(dtype, kv, CogVLM2Config(), BF16, True, device)


# ---- kernel sets: which one, per op
def test_the_ascend_tables_and_forced_backends(fake_ascend, monkeypatch, tmp_path):
    fake_ascend()
    assert sku.load_params("ascend-910b1").ascend_backends == {"rope": "builtin", "paged_attention": "builtin"}
    assert sku.load_params("ascend-310p3").source.endswith("ascend-310p.yaml")
    table = tmp_path / "t.yaml"
    table.write_text("ascend_backends:\n  paged_attention: custom\n", encoding="utf-8")
    monkeypatch.setattr(ascend_build, "installed_package", lambda: tmp_path)
    mixed = registry.get_kernels("auto", str(table), "bfloat16", device=A910B)
    assert mixed.choices == {"rope": "builtin", "paged_attention": "custom"}
    assert mixed.backend == "ascend-rope:builtin+paged_attention:custom"
    assert registry.get_kernels("ascend-custom", str(table), "bfloat16", device=A910B).backend == "ascend-custom"
    assert registry.get_kernels("ascend-builtin", str(table), "bfloat16", device=A910B).backend == "ascend-builtin"
    table.write_text("ascend_backends:\n  rope: fast\n", encoding="utf-8")
    with pytest.raises(ValueError, match="ascend_backends.rope"):
        sku.load_params(path=table)


def test_custom_ops_not_installed(fake_ascend, monkeypatch, tmp_path):
    fake_ascend()
    monkeypatch.setattr(ascend_build, "installed_package", lambda: None)
    with pytest.raises(RuntimeError, match="ascend_build.*ASCEND_CUSTOM_OPP_PATH"):
        registry.get_kernels("ascend-custom", compute_dtype="bfloat16", device=A910B)
    table = tmp_path / "t.yaml"
    table.write_text("ascend_backends:\n  rope: custom\n", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="built-in"):
        kernels = registry.get_kernels("auto", str(table), "bfloat16", device=A910B)
    assert kernels.backend == "ascend-builtin"


def test_backends_that_do_not_fit_the_device():
    with pytest.raises(ValueError, match="runs on an Ascend NPU.*CPU"):
        registry.get_kernels("ascend-builtin", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="kernels='cpu'"):
        registry.get_kernels("cpu", compute_dtype="bfloat16", device=A910B)
    with pytest.raises(ValueError, match="quantization"):
        AscendKernels(sku.load_params(), "bfloat16", {"rope": "builtin", "paged_attention": "builtin"}, "910b",
                      "w8a16", StandInPrimitives())


# ---- a mixed batch: decodes and a prefill chunk from mid-block, tokens not grouped by sequence
H, KV, D, NUM_BLOCKS = 4, 2, 32, 12
SEQUENCES = [(37, 1), (45, 25), (5, 1)]  # (context length, tokens this step): decode, prefill from position 20, decode


@dataclasses.dataclass
class Batch:
    qkv: np.ndarray
    seq_index: np.ndarray
    token_position: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    context_lens: np.ndarray
    positions: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    cache: tuple[np.ndarray, np.ndarray]  # K and V rows [num_slots, KV, D] before the step
    num_blocks: int


def make_batch(block_size: int, sequences=SEQUENCES, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    per_seq = -(-max(c for c, _ in sequences) // block_size)
    num_blocks = max(NUM_BLOCKS, per_seq * len(sequences))
    blocks = rng.permutation(num_blocks)
    tables = np.stack([blocks[s * per_seq:(s + 1) * per_seq] for s in range(len(sequences))]).astype(np.int32)
    seq_index = np.concatenate([np.full(q, s) for s, (_, q) in enumerate(sequences)])
    token_position = np.concatenate([np.arange(c - q, c) for c, q in sequences])
    routed = rng.permutation(seq_index.shape[0])  # the model's routed order mixes the sequences
    seq_index, token_position = seq_index[routed], token_position[routed]
    slots = np.array([tables[s][p // block_size] * block_size + p % block_size
                      for s, p in zip(seq_index, token_position)], np.int32)
    positions = token_position + 3  # position ids differ from indices after an image
    inv_freq = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    angles = np.arange(max(c for c, _ in sequences) + 8)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    slots_total = num_blocks * block_size
    return Batch(rng.standard_normal((seq_index.shape[0], H + 2 * KV, D)).astype(np.float32), seq_index,
                 token_position, slots, tables, np.array([c for c, _ in sequences], np.int32), positions,
                 cos.astype(np.float32), sin.astype(np.float32),
                 tuple(rng.standard_normal((slots_total, KV, D)).astype(np.float32) for _ in range(2)), num_blocks)


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(NUMPY_DTYPES[dtype]).astype(np.float32)


def run_reference(batch: Batch, block_size: int, dtype: str) -> np.ndarray:
    kernels = registry.get_kernels("reference")
    caches = [Parameter(Tensor(rounded(c, dtype)), name=f"ref_{i}", requires_grad=False)
              for i, c in enumerate(batch.cache)]
    out = kernels.paged_attention(Tensor(rounded(batch.qkv, dtype)), None, None, *caches, batch.slot_mapping,
                                  batch.seq_index, batch.token_position, batch.block_tables.tolist(),
                                  batch.context_lens.tolist(), block_size,
                                  rope=(Tensor(batch.positions.astype(np.int32)), Tensor(batch.cos), Tensor(batch.sin)))
    return out.asnumpy()


def ascend_caches(kernels: AscendKernels, batch: Batch, block_size: int, dtype: str) -> list[Parameter]:
    shape = kernels.kv_cache_shape(batch.num_blocks, block_size, KV, D)
    return [kernels.place_kv_cache(Parameter(Tensor.from_numpy(c.reshape(shape).astype(NUMPY_DTYPES[dtype])),
                                             name=f"cache_{i}", requires_grad=False))
            for i, c in enumerate(batch.cache)]


def run_ascend(kernels: AscendKernels, batch: Batch, block_size: int, dtype: str):
    caches = ascend_caches(kernels, batch, block_size, dtype)
    out = kernels.paged_attention(Tensor(rounded(batch.qkv, dtype)), None, None, *caches, batch.slot_mapping,
                                  batch.seq_index, batch.token_position, batch.block_tables,
                                  batch.context_lens, block_size,
                                  rope=(Tensor(batch.positions.astype(np.int32)), Tensor(batch.cos), Tensor(batch.sin)))
    return out.asnumpy(), caches


def kernel_set(choice: str, soc: str, dtype: str) -> AscendKernels:
    choices = dict.fromkeys(sku.ASCEND_CHOICE_OPS, choice)
    return AscendKernels(sku.load_params(), dtype, choices, soc, primitives=StandInPrimitives())


CASES = [(choice, soc, dtype, bs) for choice in ("builtin", "custom") for soc, dtype in
         (("910b", "bfloat16"), ("910b", "float16"), ("310p", "float16")) for bs in (16, 128)]


@pytest.mark.parametrize("choice, soc, dtype, block_size", CASES)
def test_mixed_batch_against_the_reference(choice, soc, dtype, block_size):
    batch = make_batch(block_size)
    kernels = kernel_set(choice, soc, dtype)
    out, caches = run_ascend(kernels, batch, block_size, dtype)
    assert out.shape == (batch.qkv.shape[0], H * D) and out.dtype == np.float32
    np.testing.assert_allclose(out, run_reference(batch, block_size, dtype), atol=TOLERANCE[dtype])
    written = caches[1].asnumpy().astype(np.float32).reshape(-1, KV, D)[batch.slot_mapping]
    np.testing.assert_array_equal(written, rounded(batch.qkv[:, H + KV:], dtype))  # V is written unrotated


def test_builtin_primitives_have_the_documented_layout_on_910b():
    block_size, dtype = 16, "bfloat16"
    batch = make_batch(block_size)
    kernels = kernel_set("builtin", "910b", dtype)
    run_ascend(kernels, batch, block_size, dtype)
    calls = kernels.prims.recorder
    t, s = batch.qkv.shape[0], len(SEQUENCES)
    (rope,) = calls.named("ApplyRotaryPosEmb")
    assert rope.init == {"cos_format": 2}
    assert rope.inputs == {"query": ("tensor", (t, H * D), "BFloat16"), "key": ("tensor", (t, KV * D), "BFloat16"),
                           "cos": ("tensor", (t, D), "BFloat16"), "sin": ("tensor", (t, D), "BFloat16"),
                           "position_ids": ("tensor", (t,), "Int32")}
    (write,) = calls.named("ReshapeAndCache")
    cache = ("tensor", (NUM_BLOCKS, block_size, KV, D), "BFloat16")
    assert write.inputs == {"key": ("tensor", (t, KV, D), "BFloat16"), "value": ("tensor", (t, KV, D), "BFloat16"),
                            "key_cache": cache, "value_cache": cache, "slot_mapping": ("tensor", (t,), "Int32")}
    (attention,) = calls.named("PagedAttention")
    assert attention.init == {"head_num": H, "scale_value": 1 / math.sqrt(D), "kv_head_num": KV,
                              "kv_cache_quant_mode": "DEFAULT", "mask_mode": "TRAPEZOIDAL", "mla_v_dim": 0}
    assert attention.inputs == {
        "query": ("tensor", (t, H, D), "BFloat16"), "key_cache": cache, "value_cache": cache,
        "block_tables": ("tensor", batch.block_tables.shape, "Int32"), "context_lens": ("tensor", (s,), "Int32"),
        "antiquant_scale": None, "antiquant_offset": None, "attn_mask": None,
        "q_seq_lens": ("tensor", (s,), "Int32"), "alibi_mask": None}
    assert not calls.named("FlashAttentionScore")


def test_decodes_only_use_paged_attention_without_q_seq_lens():
    sequences = [(37, 1), (5, 1), (16, 1)]
    batch = make_batch(16, sequences)
    kernels = kernel_set("builtin", "910b", "bfloat16")
    out, _ = run_ascend(kernels, batch, 16, "bfloat16")
    np.testing.assert_allclose(out, run_reference(batch, 16, "bfloat16"), atol=TOLERANCE["bfloat16"])
    (attention,) = kernels.prims.recorder.named("PagedAttention")
    assert attention.init["mask_mode"] == "MASK_DEFAULT" and attention.inputs["q_seq_lens"] is None
    assert attention.inputs["query"] == ("tensor", (3, H, D), "BFloat16")


@pytest.mark.parametrize("soc, dtype", [("910b", "bfloat16"), ("310p", "float16")])
def test_whole_prompts_use_flash_attention_on_910b_and_paged_attention_on_310p(soc, dtype):
    sequences = [(7, 7), (20, 20)]
    batch = make_batch(16, sequences)
    kernels = kernel_set("builtin", soc, dtype)
    out, _ = run_ascend(kernels, batch, 16, dtype)
    np.testing.assert_allclose(out, run_reference(batch, 16, dtype), atol=TOLERANCE[dtype])
    calls = kernels.prims.recorder
    if soc == "310p":
        assert not calls.named("FlashAttentionScore") and len(calls.named("PagedAttention")) == 1
        return
    (fa,) = calls.named("FlashAttentionScore")
    assert {k: fa.init[k] for k in ("head_num", "input_layout", "sparse_mode", "next_tokens", "pre_tokens")} == \
        {"head_num": H, "input_layout": "TND", "sparse_mode": 3, "next_tokens": 0, "pre_tokens": 2 ** 31 - 1}
    assert fa.inputs["query"] == ("tensor", (27, H, D), "BFloat16") and fa.inputs["key"][1] == (27, KV, D)
    assert fa.inputs["attn_mask"] == ("tensor", (2048, 2048), "UInt8")
    assert fa.inputs["actual_seq_qlen"] == fa.inputs["actual_seq_kvlen"] == (7, 27)
    assert not calls.named("PagedAttention")


def test_310p_builtins_get_an_nz_cache_and_the_custom_ops_a_flat_one():
    builtin, custom = kernel_set("builtin", "310p", "float16"), kernel_set("custom", "310p", "float16")
    assert builtin.kv_cache_shape(NUM_BLOCKS, 16, KV, D) == (NUM_BLOCKS, 16, KV * D)
    assert kernel_set("builtin", "910b", "float16").kv_cache_shape(NUM_BLOCKS, 16, KV, D) == (NUM_BLOCKS, 16, KV, D)
    assert custom.kv_cache_shape(NUM_BLOCKS, 16, KV, D) == (NUM_BLOCKS * 16, KV, D)
    batch = make_batch(16)
    run_ascend(builtin, batch, 16, "float16")
    casts = builtin.prims.recorder.named("FormatCast")
    assert len(casts) == 2 and all(c.inputs["acl_format"] == FORMAT_NZ for c in casts)
    assert casts[0].inputs["input"] == ("tensor", (NUM_BLOCKS, 16, KV * D), "Float16")


def test_custom_ops_are_called_with_their_op_host_inputs_and_attributes():
    block_size, dtype = 128, "bfloat16"
    batch = make_batch(block_size)
    kernels = kernel_set("custom", "910b", dtype)
    run_ascend(kernels, batch, block_size, dtype)
    calls = kernels.prims.recorder
    t, s = batch.qkv.shape[0], len(SEQUENCES)
    (rope,) = calls.named("Custom:RotaryCogvlm2")
    assert list(rope.inputs) == custom_declaration("RotaryCogvlm2")[0]
    assert rope.inputs["query"] == ("tensor", (t, H, D), "BFloat16")
    assert rope.inputs["cos_table"] == ("tensor", batch.cos.shape, "BFloat16")
    (attention,) = calls.named("Custom:PagedAttentionCogvlm2")
    names, attrs = custom_declaration("PagedAttentionCogvlm2")
    assert list(attention.inputs) == names + attrs and attrs == ["block_size", "scale"]
    flat = ("tensor", (NUM_BLOCKS * block_size, KV, D), "BFloat16")
    assert attention.inputs["key_cache"] == flat and attention.inputs["value_cache"] == flat
    assert attention.inputs["query_start_loc"] == ("tensor", (s + 1,), "Int32")
    assert attention.inputs["seq_lens"] == ("tensor", (s,), "Int32")
    assert attention.inputs["block_size"] == block_size and attention.inputs["scale"] == pytest.approx(D ** -0.5)
    assert attention.init["attrs"] == {"side_effect_mem": True}
    assert not calls.named("ReshapeAndCache") and not calls.named("PagedAttention")


def test_write_kv_and_dense_ops_in_the_compute_dtype():
    kernels = kernel_set("builtin", "910b", "bfloat16")
    cache = Parameter(Tensor.from_numpy(np.zeros((NUM_BLOCKS, 16, KV, D), BF16)), name="c", requires_grad=False)
    values = np.random.default_rng(1).standard_normal((3, KV, D)).astype(np.float32)
    kernels.write_kv(cache, np.array([5, 40, 17], np.int32), Tensor(values))
    np.testing.assert_array_equal(cache.asnumpy().astype(np.float32).reshape(-1, KV, D)[[5, 40, 17]],
                                  rounded(values, "bfloat16"))
    w = kernels.prepare_weight(np.ones((8, 6), np.float32))
    assert str(w.dtype) == "BFloat16"
    x = Tensor(np.arange(18, dtype=np.float32).reshape(3, 6))
    y = kernels.expert_linear(x, 1, w, w, Tensor(np.full(8, 0.5, np.float32)))
    np.testing.assert_allclose(y.asnumpy(), np.array([[15.0] * 8, [51.5] * 8, [87.5] * 8]))
    (matmul,) = kernels.prims.recorder.named("MatMul")[:1]
    assert matmul.init == {"transpose_a": False, "transpose_b": True}
    assert matmul.inputs["input"][2] == "BFloat16" and matmul.inputs["mat2"] == ("tensor", (8, 6), "BFloat16")


def test_tokens_that_are_not_a_sequences_last_positions_are_refused():
    with pytest.raises(ValueError, match="sequence 0's tokens"):
        sequence_layout(np.array([0, 0]), np.array([3, 5]), np.array([6]))
    layout = sequence_layout(np.array([1, 0, 1]), np.array([4, 9, 3]), np.array([10, 5]))
    assert layout.order.tolist() == [1, 2, 0] and layout.q_lens.tolist() == [1, 2]
    assert layout.query_start_loc.tolist() == [0, 1, 3] and layout.has_cached_context


# ---- FRACTAL_NZ
def nz_by_definition(matrix: np.ndarray) -> np.ndarray:
    """Element (m, n) at [n // 16, m // 16, m % 16, n % 16], padding zero: the layout's definition, element by
    element."""
    m, n = matrix.shape
    tiles = np.zeros(nz_shape((m, n)), matrix.dtype)
    for i in range(m):
        for j in range(n):
            tiles[j // C0, i // C0, i % C0, j % C0] = matrix[i, j]
    return tiles


@pytest.mark.parametrize("shape", [(16, 16), (128, 64), (20, 40), (1, 5)])
def test_nz_conversion_against_the_definition(shape):
    matrix = np.arange(np.prod(shape), dtype=np.float32).reshape(shape).astype(np.float16)
    tiles = nd_to_nz(matrix)
    np.testing.assert_array_equal(tiles, nz_by_definition(matrix))
    np.testing.assert_array_equal(nz_to_nd(tiles, *shape), matrix)
    flat = tiles.ravel()
    for m, n in [(0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, shape[1] // 3)]:
        assert flat[nz_offset(m, n, shape[0])] == matrix[m, n]


def test_nz_cache_blocks():
    cache = np.random.default_rng(2).standard_normal((3, 16, KV * D)).astype(np.float16)
    tiles = nd_to_nz(cache)
    assert tiles.shape == (3, KV * D // 16, 1, 16, 16)
    np.testing.assert_array_equal(tiles[1], nz_by_definition(cache[1]))
    np.testing.assert_array_equal(nz_to_nd(tiles, 16, KV * D), cache)
    assert nz_cache_shape(4, 128, 8, 128) == (4, 128, 1024)
    with pytest.raises(ValueError, match="block_size"):
        nz_cache_shape(4, 8, 8, 128)


# ---- tensor-parallel launch
def test_launch_env_renders_hccl_settings_for_ascend():
    assert launch_env("cpu", 2, {}) == {"COGVLM2_DEVICE": "cpu"}
    assert launch_env("auto", 2, {}) == {"COGVLM2_DEVICE": "auto"}
    assert launch_env("ascend", 4, {}) == {"COGVLM2_DEVICE": "ascend", "HCCL_CONNECT_TIMEOUT": "1800",
                                           "HCCL_EXEC_TIMEOUT": "1800", "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}
    user = {"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7", "HCCL_CONNECT_TIMEOUT": "900"}
    assert launch_env("ascend", 2, user) == {"COGVLM2_DEVICE": "ascend", "HCCL_CONNECT_TIMEOUT": "900",
                                             "HCCL_EXEC_TIMEOUT": "1800"}
    # `import mindspore` exports HCCL_CONNECT_TIMEOUT=600 when unset: the launch's own value replaces that one
    assert launch_env("ascend", 2, {"HCCL_CONNECT_TIMEOUT": "600"})["HCCL_CONNECT_TIMEOUT"] == "1800"
    with pytest.raises(ValueError, match="tensor_parallel_size 4 needs 4 devices"):
        launch_env("ascend", 4, {"ASCEND_RT_VISIBLE_DEVICES": "0,1"})


def test_workers_get_the_device_and_pick_their_card(monkeypatch):
    from engine import distributed
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "2,3")
    monkeypatch.delenv("HCCL_EXEC_TIMEOUT", raising=False)
    env = distributed._worker_env("127.0.0.1:1", b"k", 2, "ascend")
    assert env["COGVLM2_DEVICE"] == "ascend" and env["ASCEND_RT_VISIBLE_DEVICES"] == "2,3"
    assert env["HCCL_CONNECT_TIMEOUT"] == "1800"
    rank_1 = {**env, "DEVICE_ID": "1"}  # what msrun adds for local rank 1
    assert resolve_device(env["COGVLM2_DEVICE"], EIGHT_NPUS, rank_1, "ascend-910b2") == \
        Device("ascend", 1, 3, "ascend-910b2")


# ---- the engine on a faked 910B: every layer through the Ascend kernel set, goldens under the bf16 rule
def test_engine_on_a_faked_910b_runs_bf16_through_the_builtin_set(fake_ascend, golden_cases, golden_arrays):
    from conftest import assert_close_to_goldens
    from engine.llm_engine import LLMEngine
    primitives = fake_ascend("ascend-910b1")
    engine = LLMEngine("demo", device="ascend")
    stats = engine.stats()
    assert (stats["dtype"], stats["kv_cache_dtype"], stats["kernels"]) == ("bfloat16", "bfloat16", "ascend-builtin")
    assert engine.executor.info.device == "Ascend device 0 (ascend-910b1)"
    assert engine.executor.info.kv_cache_shape[1:] == (16, engine.config.num_kv_heads, engine.config.head_dim)
    assert_close_to_goldens(engine, golden_cases, golden_arrays, max_abs=0.5, min_cosine=0.999, margin=0.1)
    used = {c.primitive for c in primitives.recorder.calls}
    assert {"MatMul", "ApplyRotaryPosEmb", "ReshapeAndCache", "PagedAttention", "FlashAttentionScore"} <= used
    vision_matmuls = [c for c in primitives.recorder.named("MatMul") if c.inputs["mat2"][2] != "BFloat16"]
    assert not vision_matmuls  # every weight, the vision encoder's included, is bf16 on the device


# ---- MindSpore's settings per device
def fake_mindspore(calls: list):
    from types import SimpleNamespace
    record = lambda name: lambda *args: calls.append((name, args))  # noqa: E731
    return SimpleNamespace(set_device=record("set_device"), runtime=SimpleNamespace(launch_blocking=record("blocking")),
                           device_context=SimpleNamespace(cpu=SimpleNamespace(op_tuning=SimpleNamespace(
                               threads_num=record("threads")))))


def test_cpu_measured_settings_stay_on_the_cpu(monkeypatch):
    monkeypatch.setenv("COGVLM2_THREADS", "2")
    cpu, npu = [], []
    runtime._configure_cpu(fake_mindspore(cpu))
    runtime._configure_ascend(fake_mindspore(npu), Device("ascend", 3, 5, "ascend-910b1"))
    assert cpu == [("set_device", ("CPU",)), ("blocking", ()), ("threads", (2,))]
    assert npu == [("set_device", ("Ascend", 3))]


def test_a_process_cannot_switch_device(fake_ascend, monkeypatch):
    fake_ascend()
    monkeypatch.setattr(runtime, "_configured", CPU)
    with pytest.raises(RuntimeError, match="already runs on CPU.*new process"):
        runtime.configure_mindspore("ascend")
    assert runtime.configure_mindspore() == CPU  # no device asked: the configured one


def test_programs_that_name_no_device_stay_on_the_cpu(monkeypatch):
    monkeypatch.delenv("COGVLM2_DEVICE", raising=False)
    assert device_mod.device_from_env() == "cpu"
    monkeypatch.setenv("COGVLM2_DEVICE", "ascend")  # a tensor-parallel worker launched for Ascend
    assert device_mod.device_from_env() == "ascend"
