"""`cogvlm2 quantize` (cogvlm2/quantize.py): the int8 checkpoint it writes, and serving it without quantizing again,
in one process and under tensor parallelism."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mindspore import dtype as mstype
from safetensors import safe_open

from conftest import golden_prompt, greedy_params
from cogvlm2.errors import CheckpointError
from cogvlm2.model_source import DEMO_MODEL_DIR, resolve_model
from cogvlm2.weights import SCALE_SUFFIX, hf_tensor_infos, is_quantized_weight, save_hf_checkpoint
from engine.cli import main as cli_main
from kernels import quantization
from kernels.quantization import Int8Rows, dequantize, quantize_int8


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a16") / "demo-w8a16"
    assert cli_main(["quantize", "--input", str(DEMO_MODEL_DIR), "--output", str(out), "--method", "w8a16"]) == 0
    return out


def _greedy_tokens(llm, golden_cases) -> list[list[int]]:
    outs = llm.generate([golden_prompt(c) for c in golden_cases], [greedy_params(c) for c in golden_cases],
                        use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs]


def test_the_checkpoint_holds_int8_weights_with_scales_and_says_so(quantized_dir):
    config = json.loads((quantized_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "w8a16"
    assert (quantized_dir / "generation_config.json").is_file()
    source, written = hf_tensor_infos(DEMO_MODEL_DIR), hf_tensor_infos(quantized_dir)
    quantized = [name for name, info in source.items() if is_quantized_weight(name, info.shape)]
    assert "lm_head.weight" in quantized and "model.vision.patch_embedding.proj.weight" in quantized
    for name in quantized:
        assert written[name].dtype == np.int8 and written[name].shape == source[name].shape, name
        assert written[name + SCALE_SUFFIX].dtype == np.float32 and written[name + SCALE_SUFFIX].shape == \
            source[name].shape[:1], name
    for name in ("model.embed_tokens.weight", "model.vision.linear_proj.gate_proj.weight", "model.vision.conv.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert written[name].dtype == source[name].dtype and name + SCALE_SUFFIX not in written, name
    # the same round to nearest as quantizing at load
    with safe_open(DEMO_MODEL_DIR / "model-00001-of-00002.safetensors", framework="numpy") as f:
        name = next(n for n in quantized if n in f.keys())
        weight = f.get_tensor(name)
    with safe_open(quantized_dir / "model.safetensors", framework="numpy") as f:
        values, scales = f.get_tensor(name), f.get_tensor(name + SCALE_SUFFIX)
    want_values, want_scales = quantize_int8(weight.reshape(weight.shape[0], -1))
    np.testing.assert_array_equal(values.reshape(want_values.shape), want_values)
    np.testing.assert_array_equal(scales, want_scales)


def test_serving_it_applies_its_method_without_quantizing(quantized_dir, golden_cases, monkeypatch):
    from engine import LLM
    with LLM("demo", quantization="w8a16") as llm:
        quantized_at_load = _greedy_tokens(llm, golden_cases)
    def refuse(weight):
        raise AssertionError(f"a weight of shape {weight.shape} was quantized while loading")
    monkeypatch.setattr(quantization, "quantize_int8", refuse)
    with LLM(str(quantized_dir)) as llm:  # no quantization given: the checkpoint's
        assert llm.stats()["quantization"] == "w8a16"
        assert llm.engine.executor.runner.model.language.lm_head.values.dtype == mstype.int8
        assert _greedy_tokens(llm, golden_cases) == quantized_at_load


def test_either_int8_method_serves_the_checkpoint(quantized_dir, golden_cases, monkeypatch):
    """w8a8 reads the same int8 weights (its column offsets are derived from them), so it needs no other file."""
    from engine import LLM
    with LLM("demo", quantization="w8a8") as llm:
        quantized_at_load = _greedy_tokens(llm, golden_cases)
    monkeypatch.setattr(quantization, "quantize_int8", lambda w: (_ for _ in ()).throw(AssertionError("quantized")))
    with LLM(str(quantized_dir), quantization="w8a8") as llm:
        assert llm.stats()["quantization"] == "w8a8"
        assert _greedy_tokens(llm, golden_cases) == quantized_at_load


def test_tensor_parallel_ranks_slice_the_int8_weights_and_their_scales(quantized_dir, golden_cases):
    from engine import LLM
    with LLM(str(quantized_dir)) as llm:
        single = _greedy_tokens(llm, golden_cases)
    with LLM(str(quantized_dir), tensor_parallel_size=2) as llm:
        assert llm.stats()["quantization"] == "w8a16"
        assert _greedy_tokens(llm, golden_cases) == single


def test_a_rank_keeps_each_rows_scale():
    """Column-parallel weights (split by rows) take their rows' scales, row-parallel ones (split by columns) all."""
    from cogvlm2.parallel import shard_layout, shard_tensor
    config = resolve_model("demo").config
    layout = shard_layout(config, 2, 1)
    rng = np.random.default_rng(0)
    for name, shape in [("model.layers.0.mlp.language_mlp.gate_proj.weight", (config.intermediate_size,
                                                                              config.hidden_size)),
                        ("model.layers.0.mlp.language_mlp.down_proj.weight", (config.hidden_size,
                                                                              config.intermediate_size)),
                        ("model.layers.1.self_attn.vision_expert_query_key_value.weight", (config.qkv_size,
                                                                                           config.hidden_size))]:
        weight = Int8Rows(*quantize_int8(rng.standard_normal(shape).astype(np.float32)))
        shard = shard_tensor(name, weight, config, layout)
        assert isinstance(shard, Int8Rows) and shard.scales.shape == shard.values.shape[:1], name
        np.testing.assert_array_equal(dequantize(shard.values, shard.scales),
                                      shard_tensor(name, dequantize(weight.values, weight.scales), config, layout))


def test_int8_tensors_without_a_quantization_config_name_the_tensor(quantized_dir, tmp_path):
    from cogvlm2.weights import load_weights
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((quantized_dir / "config.json").read_text())
    del config["quantization_config"]
    with safe_open(quantized_dir / "model.safetensors", framework="numpy") as f:
        tensors = [(name, f.get_tensor(name)) for name in f.keys() if not name.endswith(SCALE_SUFFIX)]
    save_hf_checkpoint(tensors, bad, config)
    with pytest.raises(CheckpointError, match=r"tensor '.*' is int8.*quantization_config"):
        load_weights(resolve_model(str(bad)), progress=False)


def test_bad_quantize_invocations_are_clear(quantized_dir, tmp_path, capsys):
    assert cli_main(["quantize", "--input", str(quantized_dir), "--output", str(tmp_path / "again"),
                     "--method", "w8a16"]) == 1
    assert "already quantized (w8a16)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["quantize", "--input", "demo", "--output", str(tmp_path / "x"), "--method", "int4"])
    assert exit_info.value.code == 2
    assert cli_main(["quantize", "--input", "demo", "--output", str(quantized_dir), "--method", "w8a16"]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
