"""Ascend kernels on a CPU-only machine: what can be checked without CANN or an NPU.

1. The tiling library (kernels/ascend/op_host/cogvlm2_tiling.cpp, plain C++) is compiled with g++ into a small
   CLI (kernels/ascend/tools/tiling_cli.cpp) and checked for each SoC profile: every token / head / block is
   covered exactly once across cores, the planned Unified Buffer use fits the SoC, splits are sensible.
2. The real op_kernel sources are compiled against our CPU emulation of the Ascend C API subset they use
   (kernels/ascend/tools/emu) and run core by core on random data; outputs are compared with NumPy. This checks
   the kernels' logic under our model of the API, not CANN's compiler or the hardware (see docs/ascend.md).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ASCEND = Path(__file__).resolve().parents[1] / "kernels" / "ascend"
SOCS = ["Ascend910B2", "Ascend910B3", "Ascend310P3"]
CXX_FLAGS = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]


# ---------------------------------------------------------------- build

@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> dict[str, Path]:
    """Compile the tiling CLI and the kernel emulator (8 translation units, in parallel)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    out = tmp_path_factory.mktemp("ascend_bin")
    emu = ASCEND / "tools" / "emu"
    tiling = ASCEND / "op_host" / "cogvlm2_tiling.cpp"
    units = {"tiling.o": [str(tiling)], "main.o": [str(emu / "kernel_emulator.cpp")]}
    for dtype, suffix in (("float", "f32"), ("half", "f16"), ("bfloat16_t", "bf16")):
        defines = [f"-DEMU_DTYPE={dtype}", f"-DEMU_SUFFIX={suffix}"]
        units[f"rotary_{suffix}.o"] = defines + [str(emu / "emu_rotary.cpp")]
        units[f"attention_{suffix}.o"] = defines + [str(emu / "emu_paged_attention.cpp")]
    jobs = [subprocess.Popen([cxx, *CXX_FLAGS, f"-I{emu}", "-c", *args, "-o", str(out / name)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, args in units.items()]
    jobs.append(subprocess.Popen([cxx, *CXX_FLAGS, str(ASCEND / "tools" / "tiling_cli.cpp"), str(tiling),
                                  "-o", str(out / "tiling_cli")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for job in jobs:
        log, _ = job.communicate()
        assert job.returncode == 0, log
    link = subprocess.run([cxx, *[str(out / name) for name in units], "-o", str(out / "kernel_emulator")],
                          capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    return {"cli": out / "tiling_cli", "emulator": out / "kernel_emulator"}


def run_json(*args) -> dict | list:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def csv(values) -> str:
    return ",".join(str(int(v)) for v in values) if len(values) else "-"


def soc_profile(binaries, name: str) -> dict:
    return next(p for p in run_json(binaries["cli"], "socs") if p["name"] == name)


def rotary_tiling(binaries, soc, tokens, heads, kv_heads, head_dim, dtype_bytes=2, bf16=False) -> dict:
    return run_json(binaries["cli"], "rotary", soc, tokens, heads, kv_heads, head_dim, dtype_bytes, int(bf16))


def attention_tiling(binaries, soc, heads, kv_heads, head_dim, block_size, query_lens, seq_lens,
                     dtype_bytes=2, bf16=False) -> dict:
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).astype(int)
    return run_json(binaries["cli"], "attention", soc, heads, kv_heads, head_dim, block_size, dtype_bytes,
                    int(bf16), csv(query_start_loc), csv(seq_lens))


# ---------------------------------------------------------------- SoC profiles

def test_soc_profiles_carry_the_documented_figures(binaries):
    profiles = {p["name"]: p for p in run_json(binaries["cli"], "socs")}
    assert profiles["Ascend910B2"] == {"name": "Ascend910B2", "vector_cores": 48, "cube_cores": 24,
                                       "ub_bytes": 196608, "bf16": True}
    assert profiles["Ascend910B3"]["vector_cores"] == 40 and profiles["Ascend910B3"]["cube_cores"] == 20
    assert profiles["Ascend310P3"] == {"name": "Ascend310P3", "vector_cores": 8, "cube_cores": 8,
                                       "ub_bytes": 262144, "bf16": False}


# ---------------------------------------------------------------- rotary tiling

def assert_rotary_cover(t: dict, tokens: int, rows: int, cores: int) -> None:
    assert t["ok"], t
    assert 1 <= t["used_cores"] <= cores
    assert t["ub_bytes"] <= t["usable_ub"]
    seen = np.zeros((tokens, rows), np.int32)
    for core_tiles in t["cores"]:
        for token, row0, count in core_tiles:
            assert 1 <= count <= t["heads_per_tile"]
            seen[token, row0:row0 + count] += 1
    assert (seen == 1).all(), "every (token, head) row must be rotated exactly once"


@pytest.mark.parametrize("soc", SOCS)
@pytest.mark.parametrize("head_dim", [64, 112, 128])
@pytest.mark.parametrize("tokens", [1, 7, 32, 2048])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_rotary_covers_every_row_once_within_ub(binaries, soc, head_dim, tokens, dtype_bytes):
    heads, kv_heads = 32, 8
    t = rotary_tiling(binaries, soc, tokens, heads, kv_heads, head_dim, dtype_bytes)
    assert_rotary_cover(t, tokens, heads + kv_heads, soc_profile(binaries, soc)["vector_cores"])


def test_rotary_splits_sensibly(binaries):
    # decode, one token: its 40 heads are spread over a few cores, tiles of at least 2 KB (8 rows of 256 B)
    one = rotary_tiling(binaries, "Ascend910B2", 1, 32, 8, 128)
    assert one["used_cores"] == 5 and one["heads_per_tile"] == 8
    # decode, 32 tokens on 48 vector cores: every core busy, two tiles each
    decode = rotary_tiling(binaries, "Ascend910B2", 32, 32, 8, 128)
    assert decode["used_cores"] == 48
    assert max(len(tiles) for tiles in decode["cores"]) == 2
    # prefill: whole tokens per tile, every core busy, balanced to within one tile
    prefill = rotary_tiling(binaries, "Ascend910B2", 2048, 32, 8, 128)
    assert prefill["heads_per_tile"] == 40 and prefill["used_cores"] == 48
    counts = [len(tiles) for tiles in prefill["cores"]]
    assert max(counts) - min(counts) <= 1
    assert rotary_tiling(binaries, "Ascend310P3", 2048, 32, 8, 128)["used_cores"] == 8


def test_rotary_rejects_unsupported_shapes(binaries):
    assert not rotary_tiling(binaries, "Ascend910B2", 4, 32, 8, 100)["ok"]  # head_dim % 16 != 0
    refused = rotary_tiling(binaries, "Ascend310P3", 4, 32, 8, 128, bf16=True)
    assert not refused["ok"] and "bf16" in refused["error"]
    empty = rotary_tiling(binaries, "Ascend910B2", 0, 32, 8, 128)
    assert empty["ok"] and empty["used_cores"] == 1 and empty["cores"] == [[]]


# ---------------------------------------------------------------- paged attention tiling

def assert_attention_cover(t: dict, heads: int, kv_heads: int, block_size: int, query_lens, seq_lens,
                           cores: int) -> None:
    assert t["ok"], t
    group = heads // kv_heads
    tokens = int(np.sum(query_lens))
    starts = np.concatenate([[0], np.cumsum(query_lens)]).astype(int)
    assert 1 <= t["used_cores"] <= cores and len(t["cores"]) == t["used_cores"]
    assert t["ub_bytes"] == t["write_ub_bytes"] + t["attn_ub_bytes"] <= t["usable_ub"]
    assert block_size % t["kv_tile"] == 0 and t["q_tile"] >= 1
    written = np.zeros(tokens, np.int32)
    seen = np.zeros((tokens, heads), np.int32)
    for core in t["cores"]:
        lo, hi = core["write_tokens"]
        written[lo:hi] += 1
        for seq, q_begin, q_count, kv_head, cached, kv_len in core["items"]:
            assert 1 <= q_count <= t["q_tile"]
            assert cached == seq_lens[seq] - query_lens[seq]
            assert kv_len == cached + q_begin + q_count <= seq_lens[seq]
            rows = slice(starts[seq] + q_begin, starts[seq] + q_begin + q_count)
            seen[rows, kv_head * group:(kv_head + 1) * group] += 1
    assert (written == 1).all(), "every token's K/V must be written to the cache exactly once"
    assert (seen == 1).all(), "every (token, query head) must be computed exactly once"
    attn_cores = sum(1 for core in t["cores"] if core["items"]) or 1
    # contiguous cost-balanced ranges: no core exceeds its share by more than one item
    assert t["max_core_cost"] <= t["total_cost"] / attn_cores + t["max_item_cost"]


ATTENTION_CASES = {
    # name: (query_lens, seq_lens)
    "decode_32x512": ([1] * 32, [512] * 32),
    "prefill_2048": ([2048], [2048]),
    "mixed": ([1, 1, 1, 300, 57], [40, 1000, 17, 300, 99]),   # decodes + a fresh prefill + a chunk mid-block
    "one_token": ([1], [1]),
    "empty": ([], []),
}


@pytest.mark.parametrize("soc", SOCS)
@pytest.mark.parametrize("head_dim", [64, 112, 128])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_covers_every_token_head_once_within_ub(binaries, soc, head_dim, case):
    query_lens, seq_lens = ATTENTION_CASES[case]
    t = attention_tiling(binaries, soc, 32, 8, head_dim, 16, query_lens, seq_lens)
    assert_attention_cover(t, 32, 8, 16, query_lens, seq_lens, soc_profile(binaries, soc)["vector_cores"])


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (12, 4), (16, 4), (16, 16)])
@pytest.mark.parametrize("block_size", [1, 4, 16, 128])
def test_attention_gqa_ratios_and_block_sizes(binaries, heads, kv_heads, block_size):
    query_lens, seq_lens = [1, 5, 1, 33], [9, 5, 130, 70]
    t = attention_tiling(binaries, "Ascend910B3", heads, kv_heads, 128, block_size, query_lens, seq_lens)
    assert_attention_cover(t, heads, kv_heads, block_size, query_lens, seq_lens, 40)
    assert t["kv_tile"] == min(block_size, 64)


def test_attention_splits_sensibly(binaries):
    # decode 32 x 512 on 48 vector cores: one query per item, 256 equal items, every core busy
    decode = attention_tiling(binaries, "Ascend910B2", 32, 8, 128, 16, [1] * 32, [512] * 32)
    assert decode["q_tile"] == 1 and decode["num_items"] == 256 and decode["used_cores"] == 48
    assert decode["max_core_cost"] <= 1.15 * decode["total_cost"] / 48
    # prefill 2048: query tiles of many tokens (K/V reuse), all cores busy, causal costs balanced
    for soc, cores in (("Ascend910B2", 48), ("Ascend310P3", 8)):
        prefill = attention_tiling(binaries, soc, 32, 8, 128, 16, [2048], [2048])
        assert prefill["q_tile"] >= 8 and prefill["used_cores"] == cores
        assert prefill["max_core_cost"] <= 1.15 * prefill["total_cost"] / cores
    # more cores than work: one token with one KV head runs on one core
    tiny = attention_tiling(binaries, "Ascend910B2", 2, 1, 64, 16, [1], [1])
    assert tiny["used_cores"] == 1 and tiny["num_items"] == 1


def test_attention_rejects_bad_input(binaries):
    assert not attention_tiling(binaries, "Ascend910B2", 30, 8, 128, 16, [1], [4])["ok"]   # 30 % 8 != 0
    assert not attention_tiling(binaries, "Ascend910B2", 32, 8, 128, 16, [5], [4])["ok"]   # seq_len < q_len
    refused = attention_tiling(binaries, "Ascend310P3", 32, 8, 128, 16, [1], [4], bf16=True)
    assert not refused["ok"] and "bf16" in refused["error"]


def test_kernel_tiling_structs_match_the_op_host_definitions():
    """The emulator's structs stand in for the ones CANN generates from op_host/*_tiling.h."""
    emu = (ASCEND / "tools" / "emu" / "tiling_structs.h").read_text()
    for name in ("RotaryCogvlm2TilingData", "PagedAttentionCogvlm2TilingData"):
        host_file = "rotary_cogvlm2_tiling.h" if name.startswith("Rotary") else "paged_attention_cogvlm2_tiling.h"
        host = (ASCEND / "op_host" / host_file).read_text()
        host_fields = re.findall(r"TILING_DATA_FIELD_DEF(?:_ARR)?\((\w+),(?:\s*\d+,)?\s*(\w+)\)", host)
        body = emu.split(f"struct {name} {{", 1)[1].split("};", 1)[0]
        emu_fields = re.findall(r"(\w+)\s+(\w+)(?:\[\d+\])?;", body)
        assert host_fields == emu_fields, name


# ---------------------------------------------------------------- the real kernels, emulated

def to_device(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the raw array the kernel reads (bf16 as round-to-nearest-even bits)."""
    x = np.ascontiguousarray(x, np.float32)
    if dtype == "f32":
        return x
    if dtype == "f16":
        return x.astype(np.float16)
    bits = x.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_device(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return raw.astype(np.float32)
    if dtype == "f16":
        return raw.astype(np.float32)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def device_dtype(dtype: str):
    return {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[dtype]


TOLERANCE = {"f32": 2e-5, "f16": 2e-3, "bf16": 1.6e-2}


def write_inputs(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        np.ascontiguousarray(array).tofile(directory / f"{name}.bin")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 112, 128])
def test_emulated_rotary_matches_numpy(binaries, tmp_path, dtype, head_dim):
    rng = np.random.default_rng(head_dim)
    tokens, heads, kv_heads, positions_count = 6, 5, 3, 50
    q = rng.standard_normal((tokens, heads, head_dim))
    k = rng.standard_normal((tokens, kv_heads, head_dim))
    angles = rng.uniform(0, 6.3, (positions_count, head_dim // 2))
    cos = np.concatenate([np.cos(angles)] * 2, axis=1)
    sin = np.concatenate([np.sin(angles)] * 2, axis=1)
    positions = np.array([0, 1, 2, 2, 2, 49], np.int32)   # image tokens share a position
    device = {name: to_device(a, dtype) for name, a in (("query", q), ("key", k), ("cos", cos), ("sin", sin))}
    write_inputs(tmp_path, {**device, "positions": positions})
    for order in ("forward", "reverse"):
        info = run_json(binaries["emulator"], "rotary", "Ascend910B2", dtype, tokens, heads, kv_heads, head_dim,
                        tmp_path, order)
        assert info["ok"] and info["peak_ub_bytes"] == info["planned_ub_bytes"]
        for name, shape, x in (("query", q.shape, q), ("key", k.shape, k)):
            x = from_device(device[name], dtype).astype(np.float64)
            c = from_device(device["cos"], dtype)[positions][:, None, :]
            s = from_device(device["sin"], dtype)[positions][:, None, :]
            half = head_dim // 2
            expected = x * c + np.concatenate([-x[..., half:], x[..., :half]], -1) * s
            raw = np.fromfile(tmp_path / f"{name}_out.bin", device_dtype(dtype)).reshape(shape)
            np.testing.assert_allclose(from_device(raw, dtype), expected, rtol=TOLERANCE[dtype],
                                       atol=TOLERANCE[dtype])


def attention_case(rng, query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, drop_slot=None):
    """Inputs of one step: caches hold each sequence's first seq_len - q_len tokens; blocks are shuffled."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = rng.permutation(num_blocks)
    max_blocks = max(blocks_per_seq, default=1) or 1
    block_tables = np.zeros((len(seq_lens), max_blocks), np.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = order[used:used + n]
        used += n
    tokens = int(np.sum(query_lens))
    slots = num_blocks * block_size
    garbage = 1.0e4  # in every slot the step must not read: a wrong read shows in the output
    key_cache = np.full((slots, kv_heads, head_dim), garbage)
    value_cache = np.full((slots, kv_heads, head_dim), garbage)
    q = rng.standard_normal((tokens, heads, head_dim))
    k = rng.standard_normal((tokens, kv_heads, head_dim))
    v = rng.standard_normal((tokens, kv_heads, head_dim))
    slot_mapping = np.zeros(tokens, np.int32)
    contexts = []
    row = 0
    for s, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        positions = np.arange(seq_len)
        seq_slots = block_tables[s, positions // block_size] * block_size + positions % block_size
        cached = seq_len - q_len
        key_cache[seq_slots[:cached]] = rng.standard_normal((cached, kv_heads, head_dim))
        value_cache[seq_slots[:cached]] = rng.standard_normal((cached, kv_heads, head_dim))
        slot_mapping[row:row + q_len] = seq_slots[cached:]
        contexts.append((seq_slots, cached, row))
        row += q_len
    if drop_slot is not None:
        slot_mapping[drop_slot] = -1   # a padding-like token: not written, yet its K/V still count (from inputs)
    device = {"query": to_device(q, dtype), "key": to_device(k, dtype), "value": to_device(v, dtype),
              "key_cache": to_device(key_cache, dtype), "value_cache": to_device(value_cache, dtype)}
    ints = {"slot_mapping": slot_mapping, "block_tables": block_tables,
            "query_start_loc": np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
            "seq_lens": np.asarray(seq_lens, np.int32)}
    return device, ints, contexts


def reference_attention(device, ints, contexts, query_lens, heads, kv_heads, dtype):
    q = from_device(device["query"], dtype).astype(np.float64)
    k_new = from_device(device["key"], dtype).astype(np.float64)
    v_new = from_device(device["value"], dtype).astype(np.float64)
    k_cache = from_device(device["key_cache"], dtype).astype(np.float64)
    v_cache = from_device(device["value_cache"], dtype).astype(np.float64)
    group = heads // kv_heads
    out = np.zeros_like(q)
    for (seq_slots, cached, row), q_len in zip(contexts, query_lens):
        keys = np.concatenate([k_cache[seq_slots[:cached]], k_new[row:row + q_len]])
        values = np.concatenate([v_cache[seq_slots[:cached]], v_new[row:row + q_len]])
        for i in range(q_len):
            visible = cached + i + 1
            for h in range(heads):
                scores = keys[:visible, h // group] @ q[row + i, h] / np.sqrt(q.shape[-1])
                p = np.exp(scores - scores.max())
                out[row + i, h] = p @ values[:visible, h // group] / p.sum()
    return out


EMULATED_ATTENTION = [
    # (query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype)
    ([1, 1, 3, 1], [5, 9, 3, 1], 8, 2, 64, 4, "f32"),                     # decodes + a fresh 3-token prefill
    ([1, 20, 1, 37], [70, 27, 18, 37], 12, 4, 112, 16, "f32"),            # chunk starting mid-block, GQA 3
    ([2, 1, 9], [2, 33, 45], 4, 4, 128, 1, "f32"),                        # block size 1, no GQA
    ([1, 1, 1, 1], [17, 64, 1, 130], 8, 2, 128, 16, "bf16"),              # decode-only, bf16
    ([70, 1], [70, 200], 16, 4, 128, 16, "bf16"),                         # prefill longer than a query tile
    ([5, 1], [12, 3], 8, 8, 64, 4, "f16"),
]


@pytest.mark.parametrize("case", EMULATED_ATTENTION, ids=lambda c: f"{c[6]}-d{c[4]}-bs{c[5]}-g{c[2] // c[3]}")
def test_emulated_paged_attention_matches_numpy(binaries, tmp_path, case):
    query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype = case
    rng = np.random.default_rng(sum(seq_lens))
    drop = 0 if query_lens[0] > 1 else None
    device, ints, contexts = attention_case(rng, query_lens, seq_lens, heads, kv_heads, head_dim, block_size,
                                            dtype, drop_slot=drop)
    write_inputs(tmp_path, {**device, **ints})
    expected = reference_attention(device, ints, contexts, query_lens, heads, kv_heads, dtype)
    tokens = int(np.sum(query_lens))
    for order in ("forward", "reverse"):   # cores run concurrently on the device: order must not matter
        info = run_json(binaries["emulator"], "attention", "Ascend910B2", dtype, heads, kv_heads, head_dim,
                        block_size, head_dim ** -0.5, tmp_path, order)
        assert info["ok"] and info["peak_ub_bytes"] == info["planned_ub_bytes"]
        raw = np.fromfile(tmp_path / "attn_out.bin", device_dtype(dtype)).reshape(tokens, heads, head_dim)
        np.testing.assert_allclose(from_device(raw, dtype), expected, rtol=TOLERANCE[dtype],
                                   atol=TOLERANCE[dtype])
        for name, new in (("key", device["key"]), ("value", device["value"])):
            cache = np.fromfile(tmp_path / f"{name}_cache_out.bin", device_dtype(dtype))
            cache = cache.reshape(device[f"{name}_cache"].shape)
            written = ints["slot_mapping"] >= 0
            np.testing.assert_array_equal(cache[ints["slot_mapping"][written]], new[written])
            untouched = np.ones(len(cache), bool)
            untouched[ints["slot_mapping"][written]] = False
            np.testing.assert_array_equal(cache[untouched], device[f"{name}_cache"][untouched])


# ---------------------------------------------------------------- build script (kernels/ascend_build.py)

def test_build_skips_cleanly_without_cann(tmp_path, monkeypatch, capsys):
    from kernels import ascend_build

    for variable in ascend_build.CANN_ENV_VARS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(ascend_build, "DEFAULT_CANN_ROOTS", (str(tmp_path / "no-cann"),))
    assert ascend_build.build_ascend_kernels(tmp_path / "build") is False
    message = capsys.readouterr().out
    assert "skipping the Ascend C kernels" in message and "no-cann: not found" in message
    assert "ASCEND_HOME_PATH" in message
    assert not (tmp_path / "build").exists()


def test_build_reports_a_toolkit_without_compiler(tmp_path, capsys):
    from kernels import ascend_build

    (tmp_path / "cann").mkdir()
    assert ascend_build.build_ascend_kernels(tmp_path / "build", roots=[tmp_path / "cann"]) is False
    assert "no ccec/bisheng compiler" in capsys.readouterr().out


def fake_cann(root: Path, build_script: str) -> Path:
    """A toolkit layout with a compiler stub and an op-project template whose build.sh is `build_script`."""
    (root / "compiler" / "ccec_compiler" / "bin").mkdir(parents=True)
    (root / "compiler" / "ccec_compiler" / "bin" / "ccec").write_text("")
    template = root / "tools" / "op_project_templates" / "ascendc" / "customize"
    for part in ("op_host", "op_kernel", "cmake/util"):
        (template / part).mkdir(parents=True)
    (template / "op_host" / "add_custom.cpp").write_text("// template sample")
    (template / "op_kernel" / "add_custom.cpp").write_text("// template sample")
    (template.parent / "common").mkdir()
    (template.parent / "common" / "helper.cmake").write_text("# shared")
    variables = {k: {"type": "STRING", "value": ""} for k in ("ASCEND_CANN_PACKAGE_PATH", "ASCEND_COMPUTE_UNIT",
                                                               "vendor_name")}
    (template / "CMakePresets.json").write_text(json.dumps({"configurePresets": [{"cacheVariables": variables}]}))
    (template / "build.sh").write_text(build_script)
    return root


FAKE_BUILD = """\
set -e
test -f op_host/rotary_cogvlm2.cpp && test -f op_host/cogvlm2_tiling.h && test -f op_kernel/paged_attention_cogvlm2.cpp
test ! -e op_host/add_custom.cpp && test -f cmake/util/helper.cmake
mkdir -p build_out
cat > build_out/custom_opp_linux_x86_64.run <<'RUN'
for arg in "$@"; do case $arg in --install-path=*) mkdir -p "${arg#*=}/vendors/cogvlm2";; esac; done
RUN
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="the build flow checks for cmake")
def test_build_flow_with_a_fake_toolkit(tmp_path):
    """The project assembly, preset edits, .run discovery and install step, with CANN's build.sh faked."""
    from kernels import ascend_build

    root = fake_cann(tmp_path / "cann", FAKE_BUILD)
    install = tmp_path / "opp"
    assert ascend_build.build_ascend_kernels(tmp_path / "build", ("ascend910b",), roots=[root],
                                             install_path=install) is True
    presets = json.loads((tmp_path / "build" / "CustomProject" / "CMakePresets.json").read_text())
    variables = presets["configurePresets"][0]["cacheVariables"]
    assert variables["ASCEND_CANN_PACKAGE_PATH"]["value"] == str(root)
    assert variables["ASCEND_COMPUTE_UNIT"]["value"] == "ascend910b"
    assert variables["vendor_name"]["value"] == "cogvlm2"
    assert (install / "vendors" / "cogvlm2").is_dir()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="the build flow checks for cmake")
def test_build_failure_returns_false_with_the_log(tmp_path, capsys):
    from kernels import ascend_build

    root = fake_cann(tmp_path / "cann", "echo compiler error >&2; exit 3\n")
    assert ascend_build.build_ascend_kernels(tmp_path / "build", roots=[root]) is False
    assert "build failed" in capsys.readouterr().out
    assert "compiler error" in (tmp_path / "build" / "ascend_build.log").read_text()


def test_installed_package_lookup(tmp_path, monkeypatch):
    from kernels import ascend_build

    monkeypatch.setenv("ASCEND_CUSTOM_OPP_PATH", "")
    assert ascend_build.installed_package() is None
    package = tmp_path / "vendors" / "cogvlm2"
    (package / "op_impl").mkdir(parents=True)
    monkeypatch.setenv("ASCEND_CUSTOM_OPP_PATH", f"/nonexistent:{package}")
    assert ascend_build.installed_package() == package
