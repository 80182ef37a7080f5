"""Checkpoint I/O: HF safetensors (demo checkpoint and modified copies), random checkpoints, MindFormers .ckpt."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from cogvlm2.config import CogVLM2Config
from cogvlm2.convert import main as convert_main
from cogvlm2.errors import CheckpointError, CheckpointNotFoundError
from cogvlm2.model_source import DEMO_MODEL_DIR, ModelSource, resolve_model
from cogvlm2.weights import (INDEX_FILE, SINGLE_FILE, hf_tensor_infos, hf_to_mindformers, hf_weight_shapes,
                             is_optional_tensor, iter_hf_tensors, load_weights, make_random_checkpoint,
                             mindformers_to_hf, random_weights, save_hf_checkpoint, write_mindformers_ckpt)

Tensors = Iterator[tuple[str, np.ndarray]]


BF16 = np.dtype(ml_dtypes.bfloat16)

@pytest.fixture(scope="module")
def demo() -> ModelSource:
    return resolve_model("demo")


@pytest.fixture(scope="module")
def demo_weights(demo: ModelSource):
    return load_weights(demo, progress=False)


@pytest.fixture(scope="module")
def tiny_config() -> CogVLM2Config:
    return resolve_model("tiny").config


def demo_copy(out_dir: Path, edit: Callable[[Tensors], Tensors] = lambda t: t, **kwargs) -> ModelSource:
    """The demo checkpoint rewritten through `edit` into out_dir (sharded like the original unless told)."""
    config_json = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    kwargs.setdefault("shard_size_bytes", 20 * 10**6)
    save_hf_checkpoint(edit(iter_hf_tensors(DEMO_MODEL_DIR)), out_dir, config_json, **kwargs)
    return resolve_model(out_dir)


def ckpt_source(path: Path, config: CogVLM2Config) -> ModelSource:
    return ModelSource(path.stem, config, path)


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """The same values (a float32 load of a bf16 source widens exactly), each side float32 or bf16."""
    assert a.keys() == b.keys()
    for name in a:
        assert {a[name].dtype, b[name].dtype} <= {np.dtype(np.float32), BF16}, name
        np.testing.assert_array_equal(a[name].astype(np.float32), b[name].astype(np.float32), err_msg=name)


# ---- HF tensor list and the demo checkpoint ----------------------------------------------------------------------
def test_hf_weight_shapes_match_demo_headers(demo: ModelSource):
    infos = hf_tensor_infos(DEMO_MODEL_DIR)
    expected = hf_weight_shapes(demo.config)
    assert {name: info.shape for name, info in infos.items()} == expected
    assert expected["model.layers.0.self_attn.language_expert_query_key_value.weight"] == ((4 + 2 * 2) * 16, 64)
    assert expected["model.vision.patch_embedding.position_embedding.weight"] == (65, 96)
    assert expected["model.vision.conv.weight"] == (96, 96, 2, 2)


def test_real_model_tensor_count_and_size():
    config = resolve_model("cogvlm2-llama3-chat-19b").config
    shapes = hf_weight_shapes(config)
    params = sum(int(np.prod(s)) for name, s in shapes.items() if not is_optional_tensor(name))
    assert 19.0e9 < params < 19.6e9  # "19.5B parameters"
    assert shapes["model.layers.31.self_attn.vision_expert_query_key_value.bias"] == (6144,)
    assert shapes["model.vision.patch_embedding.position_embedding.weight"] == (9217, 1792)
    assert shapes["model.vision.patch_embedding.cls_embedding"] == (1, 1792)


def test_demo_loads_every_tensor_as_float32(demo: ModelSource, demo_weights):
    expected = {n: s for n, s in hf_weight_shapes(demo.config).items() if not is_optional_tensor(n)}
    assert {name: t.shape for name, t in demo_weights.tensors.items()} == expected
    assert all(t.dtype == np.float32 for t in demo_weights.tensors.values())
    assert demo_weights.source_dtype == "bfloat16"
    assert demo_weights.inv_freq.dtype == np.float32 and demo_weights.inv_freq.shape == (8,)


def test_demo_values_are_bf16_exact(demo_weights):
    name = "model.layers.1.mlp.vision_mlp.up_proj.weight"
    with safe_open(DEMO_MODEL_DIR / "model-00001-of-00002.safetensors", framework="numpy") as f:
        stored = f.get_tensor(name)
        inv_freq = f.get_tensor("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert stored.dtype.name == "bfloat16"  # the reader's bfloat16 may be a distinct dtype instance (precision.py)
    loaded = demo_weights.tensors[name]
    np.testing.assert_array_equal(loaded, stored.astype(np.float32))
    np.testing.assert_array_equal(loaded.astype(ml_dtypes.bfloat16).astype(np.float32), loaded)
    assert np.abs(loaded).max() > 0
    np.testing.assert_array_equal(demo_weights.inv_freq, inv_freq)


def test_consume_hook_receives_each_tensor_once(demo: ModelSource, demo_weights):
    seen: dict[str, np.ndarray] = {}
    loaded = load_weights(demo, consume=lambda name, t: seen.setdefault(name, t), progress=False)
    assert loaded.tensors == {}
    assert_same_tensors(seen, demo_weights.tensors)


# ---- broken checkpoints -------------------------------------------------------------------------------------------
def test_missing_tensor_is_named(tmp_path: Path):
    dropped = "model.layers.1.mlp.vision_mlp.up_proj.weight"
    source = demo_copy(tmp_path, lambda ts: ((n, t) for n, t in ts if n != dropped))
    with pytest.raises(CheckpointError, match=f"missing 1 tensor.*'{dropped}'"):
        load_weights(source, progress=False)


def test_missing_inv_freq_is_allowed(tmp_path: Path, demo_weights):
    source = demo_copy(tmp_path, lambda ts: ((n, t) for n, t in ts if not is_optional_tensor(n)))
    loaded = load_weights(source, progress=False)
    assert loaded.inv_freq is None
    assert_same_tensors(loaded.tensors, demo_weights.tensors)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path: Path):
    def widen_norm(ts: Tensors) -> Tensors:
        for name, t in ts:
            yield name, (np.ones(65, t.dtype) if name == "model.norm.weight" else t)
    source = demo_copy(tmp_path, widen_norm)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(65,\), expected \(64,\)"):
        load_weights(source, progress=False)


def test_missing_shard_file_is_named(tmp_path: Path):
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_DIR, copy)
    shard = copy / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(CheckpointNotFoundError, match=str(shard)):
        load_weights(resolve_model(copy), progress=False)


def test_missing_folder_and_ckpt_file(tmp_path: Path, demo: ModelSource):
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        load_weights(ModelSource("x", demo.config, tmp_path / "nowhere"), progress=False)
    with pytest.raises(CheckpointNotFoundError, match="absent.ckpt"):
        load_weights(ckpt_source(tmp_path / "absent.ckpt", demo.config), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=SINGLE_FILE):
        load_weights(ModelSource("x", demo.config, tmp_path / "empty"), progress=False)


def test_extra_tensor_warns_and_is_ignored(tmp_path: Path, demo_weights):
    def add_extra(ts: Tensors) -> Tensors:
        yield from ts
        yield "model.vision.final_layernorm.weight", np.ones(96, np.float32)
    source = demo_copy(tmp_path, add_extra)
    with pytest.warns(UserWarning, match="model.vision.final_layernorm.weight"):
        loaded = load_weights(source, progress=False)
    assert_same_tensors(loaded.tensors, demo_weights.tensors)


# ---- other layouts and dtypes ------------------------------------------------------------------------------------
def test_single_file_checkpoint_loads(tmp_path: Path, demo_weights):
    source = demo_copy(tmp_path, shard_size_bytes=10**9)
    assert (tmp_path / SINGLE_FILE).is_file() and not (tmp_path / INDEX_FILE).exists()
    loaded = load_weights(source, progress=False)
    assert_same_tensors(loaded.tensors, demo_weights.tensors)
    np.testing.assert_array_equal(loaded.inv_freq, demo_weights.inv_freq)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_fp16_and_fp32_checkpoints_load(tmp_path: Path, demo_weights, dtype):
    def cast(ts: Tensors) -> Tensors:
        for name, t in ts:
            yield name, (t if is_optional_tensor(name) else t.astype(np.float32).astype(dtype))
    loaded = load_weights(demo_copy(tmp_path, cast), progress=False)
    assert loaded.source_dtype == np.dtype(dtype).name
    expected = {name: t.astype(dtype).astype(np.float32) for name, t in demo_weights.tensors.items()}
    assert_same_tensors(loaded.tensors, expected)


# ---- random weights ----------------------------------------------------------------------------------------------
def test_random_weights_are_deterministic_and_initialised_by_kind(tiny_config: CogVLM2Config):
    first = dict(random_weights(tiny_config, seed=3))
    again = dict(random_weights(tiny_config, seed=3))
    other = dict(random_weights(tiny_config, seed=4))
    assert list(first) == list(hf_weight_shapes(tiny_config))
    assert_same_tensors(first, again)
    qkv = "model.layers.0.self_attn.language_expert_query_key_value.weight"
    assert not np.array_equal(first[qkv], other[qkv])
    assert abs(float(first["model.embed_tokens.weight"].astype(np.float32).std()) - 0.02) < 1e-3
    assert (first["model.norm.weight"] == 1).all() and (first["model.vision.linear_proj.norm1.weight"] == 1).all()
    assert (first["model.layers.1.self_attn.vision_expert_query_key_value.bias"] == 0).all()
    inv_freq = first["model.layers.0.self_attn.rotary_emb.inv_freq"]
    np.testing.assert_allclose(inv_freq, 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)


def test_random_source_loads_random_weights(tiny_config: CogVLM2Config):
    loaded = load_weights(ModelSource("tiny", tiny_config, None, random_seed=5), progress=False)
    expected = {n: t for n, t in random_weights(tiny_config, 5) if not is_optional_tensor(n)}
    assert_same_tensors(loaded.tensors, expected)
    assert all(t.dtype == np.float32 for t in loaded.tensors.values())  # load_weights' default storage
    # a preset's random weights are stored in its param_init_type (bf16), as a real checkpoint of it would be
    assert loaded.inv_freq.dtype == np.float32 and loaded.source_dtype == "bfloat16"


def test_make_random_checkpoint_is_sharded_and_loadable(tmp_path: Path, tiny_config: CogVLM2Config):
    make_random_checkpoint(tiny_config, tmp_path, seed=1, dtype="bf16", shard_size_bytes=10 * 10**6)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_weights(resolve_model(tmp_path), progress=False)
    assert loaded.source_dtype == "bfloat16" and loaded.inv_freq.dtype == np.float32
    expected = {n: t.astype(ml_dtypes.bfloat16).astype(np.float32)
                for n, t in random_weights(tiny_config, 1) if not is_optional_tensor(n)}
    assert_same_tensors(loaded.tensors, expected)


def test_make_random_refuses_a_folder_holding_a_checkpoint(tmp_path: Path, tiny_config: CogVLM2Config):
    shutil.copy(DEMO_MODEL_DIR / "model-00001-of-00002.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        make_random_checkpoint(tiny_config, tmp_path)


# ---- MindFormers .ckpt -------------------------------------------------------------------------------------------
def test_name_mapping_round_trips_for_every_hf_name():
    config = resolve_model("cogvlm2-llama3-chat-19b").config
    mf_names = set()
    for name in hf_weight_shapes(config):
        mf_name = hf_to_mindformers(name)
        if is_optional_tensor(name) and name != "model.layers.0.self_attn.rotary_emb.inv_freq":
            assert mf_name is None
            continue
        assert mf_name is not None and mf_name not in mf_names, name
        mf_names.add(mf_name)
        assert mindformers_to_hf(mf_name) == name
    assert mindformers_to_hf("llm_model.model.layers.3.mlp.language_mlp.w9.weight") is None


@pytest.mark.parametrize("hf_name, mf_name", [
    ("model.embed_tokens.weight", "llm_model.model.tok_embeddings.embedding_weight"),
    ("model.norm.weight", "llm_model.model.norm_out.weight"),
    ("model.layers.7.mlp.vision_mlp.gate_proj.weight", "llm_model.model.layers.7.mlp.vision_mlp.w1.weight"),
    ("model.layers.7.mlp.language_mlp.up_proj.weight", "llm_model.model.layers.7.mlp.language_mlp.w3.weight"),
    ("model.layers.7.mlp.language_mlp.down_proj.weight", "llm_model.model.layers.7.mlp.language_mlp.w2.weight"),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", "llm_model.model.freqs_mgr.freqs"),
    ("model.vision.transformer.layers.62.input_layernorm.bias", "vision_encoder.blocks.62.norm1.beta"),
    ("model.vision.transformer.layers.2.attention.dense.weight", "vision_encoder.blocks.2.attn.proj.weight"),
    ("model.vision.linear_proj.norm1.weight", "mlp_adapter.linear_proj.norm1.gamma"),
    ("model.vision.boi", "mlp_adapter.boi"),
])
def test_name_mapping_follows_mindformers(hf_name: str, mf_name: str):
    assert hf_to_mindformers(hf_name) == mf_name


@pytest.fixture(scope="module")
def demo_ckpts(tmp_path_factory, demo: ModelSource) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ckpt")
    return {dtype: write_mindformers_ckpt(demo, out / f"demo_{dtype}.ckpt", dtype, progress=False)
            for dtype in ("fp32", "bf16")}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ckpt_round_trip_gives_the_hf_tensors(demo_ckpts, demo: ModelSource, demo_weights, dtype: str):
    loaded = load_weights(ckpt_source(demo_ckpts[dtype], demo.config), progress=False)
    assert_same_tensors(loaded.tensors, demo_weights.tensors)
    assert loaded.source_dtype == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert loaded.inv_freq.dtype == np.float32  # inv_freq keeps its stored dtype
    np.testing.assert_array_equal(loaded.inv_freq, demo_weights.inv_freq)


def test_ckpt_holds_mindformers_names_and_shapes(demo_ckpts):
    import mindspore
    params = mindspore.load_checkpoint(str(demo_ckpts["bf16"]))
    assert tuple(params["vision_encoder.cls_token"].shape) == (1, 1, 96)
    assert tuple(params["vision_encoder.pos_embed"].shape) == (1, 65, 96)
    assert params["llm_model.model.tok_embeddings.embedding_weight"].dtype == mindspore.bfloat16
    assert "llm_model.model.freqs_mgr.freqs" in params
    assert not any("inv_freq" in name or name.startswith("model.") for name in params)
    assert len(params) == 81 - 1  # layer 1's inv_freq dropped


def test_ckpt_with_wrong_config_fails_naming_the_tensor(demo_ckpts, tiny_config: CogVLM2Config):
    wrong = CogVLM2Config.from_hf_dict({**tiny_config.to_hf_dict(), "intermediate_size": 128})
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' has shape \(160, 64\), expected \(128, 64\)"):
        load_weights(ckpt_source(demo_ckpts["fp32"], wrong), progress=False)


# ---- command line ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--modal", "video"), ("--model", "llama3")])
def test_convert_cli_rejects_other_models(tmp_path: Path, capsys, flag: str, value: str):
    argv = ["convert", "--input_path", str(DEMO_MODEL_DIR), "--output_path", str(tmp_path / "x.ckpt"), flag, value]
    assert convert_main(argv) == 2
    assert f"{flag} '{value}' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_convert_cli_rejects_bad_dtype_and_missing_input(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        convert_main(["convert", "--input_path", "x", "--output_path", "y.ckpt", "--dtype", "int8"])
    argv = ["convert", "--modal", "image", "--model", "cogvlm2", "--input_path", str(tmp_path / "nope"),
            "--output_path", str(tmp_path / "x.ckpt"), "--dtype", "fp16"]
    assert convert_main(argv) == 1
    assert "nope" in capsys.readouterr().err


def test_convert_cli_writes_a_loadable_fp16_ckpt(tmp_path: Path, demo_weights):
    out = tmp_path / "demo.ckpt"
    argv = ["convert", "--modal", "image", "--model", "cogvlm2", "--input_path", str(DEMO_MODEL_DIR),
            "--output_path", str(out), "--dtype", "fp16"]
    assert convert_main(argv) == 0
    loaded = load_weights(resolve_model(out), progress=False)  # config.json written beside it
    expected = {name: t.astype(np.float16).astype(np.float32) for name, t in demo_weights.tensors.items()}
    assert_same_tensors(loaded.tensors, expected)


def test_make_random_cli(tmp_path: Path, capsys, tiny_config: CogVLM2Config):
    assert convert_main(["make-random", "--preset", "tiny", "--out", str(tmp_path / "t"), "--dtype", "fp32"]) == 0
    loaded = load_weights(resolve_model(tmp_path / "t"), progress=False)
    expected = {n: t for n, t in random_weights(tiny_config, 0) if not is_optional_tensor(n)}
    assert_same_tensors(loaded.tensors, expected)
    assert convert_main(["make-random", "--preset", "huge", "--out", str(tmp_path / "h")]) == 2
    assert "unknown --preset 'huge'" in capsys.readouterr().err
