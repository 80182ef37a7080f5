"""Config defaults and presets, the bf16 RoPE table, and expert routing (each token through exactly one expert)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mindspore import Tensor

from conftest import FIXTURES, TINY
from cogvlm2.config import CogVLM2Config
from cogvlm2.errors import CheckpointNotFoundError, ConfigError
from cogvlm2.layers import expert_linear
from cogvlm2.model_source import resolve_model
from cogvlm2.rope import BF16, default_inv_freq, rope_cos_sin


def test_hf_config_defaults():
    raw = json.loads((TINY / "config.json").read_text())
    cfg = CogVLM2Config.from_hf_dict(raw)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.tokens_per_image, cfg.rope_theta) == (2, 16, 18, 500000.0)
    del raw["num_multi_query_heads"]
    raw["num_attention_heads"] = 8
    assert CogVLM2Config.from_hf_dict(raw).num_kv_heads == 8  # the published default when absent


@pytest.mark.parametrize("preset, tokens_per_image, hidden, kv", [
    ("tiny", 18, 64, 2), ("bench", 66, 1024, 4), ("cogvlm2-llama3-chat-19b", 2306, 4096, 8)])
def test_presets(preset, tokens_per_image, hidden, kv):
    source = resolve_model(preset)
    assert source.checkpoint is None
    cfg = source.config
    assert (cfg.tokens_per_image, cfg.hidden_size, cfg.num_kv_heads) == (tokens_per_image, hidden, kv)
    assert cfg.eos_token_ids == (128001, 128009) and cfg.rope_theta == 500000.0


def test_bench_preset_sizes():
    cfg = resolve_model("bench").config
    v = cfg.vision
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size) == \
           (8, 16, 2816, 128256)
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.num_heads, v.intermediate_size) == \
           (224, 14, 512, 6, 8, 2048)


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ConfigError, match="no-such"):
        resolve_model("no-such")
    with pytest.raises(CheckpointNotFoundError):
        resolve_model(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ConfigError, match="divisible"):
        CogVLM2Config(num_attention_heads=32, num_kv_heads=5)


def test_rope_bf16_table_matches_the_published_model_exactly():
    ref = np.load(FIXTURES / "rope_bf16.npz")
    inv_freq = ref["inv_freq_bf16"].astype(BF16)
    assert np.array_equal(default_inv_freq(128, 500000.0).astype(BF16).astype(np.float32), ref["inv_freq_bf16"])
    cos, sin = rope_cos_sin(inv_freq, ref["positions"])
    assert np.array_equal(cos.astype(BF16), ref["cos"].astype(BF16))
    assert np.array_equal(sin.astype(BF16), ref["sin"].astype(BF16))
    i256, i257 = list(ref["positions"]).index(256), list(ref["positions"]).index(257)
    assert np.array_equal(cos[i256], cos[i257])  # bf16 rounds position 257 to 256


def test_rope_fp32_table_has_no_rounding():
    inv = default_inv_freq(16, 500000.0)
    cos, _ = rope_cos_sin(inv, np.array([256, 257]))
    assert not np.array_equal(cos[0], cos[1])


def test_each_token_goes_through_exactly_one_expert():
    """Poison one expert's weights with NaN: rows routed to the other expert must stay finite and exact."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    wl, wv, bv = (rng.standard_normal(s).astype(np.float32) for s in ((3, 5), (3, 5), (3,)))
    nan = np.full_like(wl, np.nan)
    num_language = 4
    y = expert_linear(Tensor(x), num_language, Tensor(wl), Tensor(nan), Tensor(bv)).asnumpy()
    np.testing.assert_allclose(y[:num_language], x[:num_language] @ wl.T, rtol=1e-5)
    assert np.isnan(y[num_language:]).all()
    y = expert_linear(Tensor(x), num_language, Tensor(nan), Tensor(wv), Tensor(bv)).asnumpy()
    np.testing.assert_allclose(y[num_language:], x[num_language:] @ wv.T + bv, rtol=1e-5)
    assert np.isnan(y[:num_language]).all()
    only_language = expert_linear(Tensor(x), 7, Tensor(wl), Tensor(nan), Tensor(bv)).asnumpy()
    assert np.isfinite(only_language).all()  # the vision bias never touches language rows
