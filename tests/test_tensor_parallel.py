"""Tensor parallelism (engine/distributed.py, engine/worker.py, cogvlm2/parallel.py): sharding rules, the goldens
with 2 msrun workers through the Python API and the CLI, clear errors, and a worker killed mid-run."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cogvlm2.config import CogVLM2Config
from cogvlm2.model_source import resolve_model
from cogvlm2.parallel import kv_heads_per_rank, shard_layout, shard_tensor
from conftest import TINY, assert_golden, assert_no_leak, case_image, golden_prompt, greedy_params, margin_limit
from engine import LLM, SamplingParams
from engine.distributed import MsrunNotFoundError, Timeouts, WorkerFailure, is_running
from engine.llm_engine import LLMEngine

REPO = Path(__file__).resolve().parents[1]
FAILURE_BOUND_SECONDS = 15.0  # from a worker's death to the caller's error


def _assert_group_gone(executor) -> None:
    assert executor.group.msrun.poll() is not None
    assert not [pid for pid in executor.group.pids if is_running(pid)]


# ---- sharding rules (no processes) --------------------------------------------------------------------------------
def test_layout_splits_heads_and_replicates_kv_heads_when_fewer_than_ranks():
    real = CogVLM2Config()  # 32 heads, 8 KV heads
    assert [(s.kv_heads.start, s.kv_heads.stop) for s in (shard_layout(real, 4, r) for r in range(4))] == \
        [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert kv_heads_per_rank(real, 16) == 1
    # 16 ranks over 8 KV heads: ranks 2k and 2k+1 share KV head k, which their query heads read (group of 4)
    for r in range(16):
        layout = shard_layout(real, 16, r)
        assert layout.kv_heads.start == r // 2 == layout.heads.start // (32 // 8)
    assert shard_layout(real, 2, 1).vocab.start == 128256 // 2


def test_indivisible_sizes_are_value_errors_naming_tensor_parallel_size():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the number of attention heads"):
        LLM("demo", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        LLM("demo", tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=64 does not divide the number of attention heads"):
        shard_layout(CogVLM2Config(), 64, 0)


def test_shards_are_the_right_rows_and_columns():
    from cogvlm2.weights import load_weights
    source = resolve_model("demo")
    c = source.config  # 4 heads, 2 KV heads, head_dim 16
    full = load_weights(source, progress=False).tensors
    name = "model.layers.1.self_attn.vision_expert_query_key_value.weight"
    q, k, v = np.split(full[name], [4 * 16, 6 * 16])
    for size in (2, 4):
        shards = [shard_tensor(name, full[name], c, shard_layout(c, size, r)) for r in range(size)]
        heads = 4 // size
        for r, shard in enumerate(shards):
            kv = shard_layout(c, size, r).kv_heads.start
            assert shard.shape == ((heads + 2) * 16, 64)
            np.testing.assert_array_equal(shard[:heads * 16], q[r * heads * 16:(r + 1) * heads * 16])
            np.testing.assert_array_equal(shard[heads * 16:], np.concatenate([k[kv * 16:(kv + 1) * 16],
                                                                              v[kv * 16:(kv + 1) * 16]]))
    layouts = [shard_layout(c, 2, r) for r in range(2)]
    for name, axis in [("model.layers.0.self_attn.language_expert_dense.weight", 1),
                       ("model.layers.0.mlp.vision_mlp.up_proj.weight", 0),
                       ("model.layers.0.mlp.vision_mlp.down_proj.weight", 1), ("lm_head.weight", 0),
                       ("model.vision.transformer.layers.2.mlp.fc1.bias", 0),
                       ("model.vision.transformer.layers.2.attention.dense.weight", 1)]:
        np.testing.assert_array_equal(np.concatenate([shard_tensor(name, full[name], c, s) for s in layouts], axis),
                                      full[name])
    vision_qkv = "model.vision.transformer.layers.0.attention.query_key_value.bias"  # [3, heads, hd]
    parts = [shard_tensor(vision_qkv, full[vision_qkv], c, s).reshape(3, 2, -1) for s in layouts]
    np.testing.assert_array_equal(np.concatenate(parts, 1).reshape(-1), full[vision_qkv])
    for replicated in ("model.norm.weight", "model.vision.boi", "model.vision.transformer.layers.0.input_layernorm.bias"):
        assert shard_tensor(replicated, full[replicated], c, layouts[1]) is full[replicated]


def _odd_vision_config() -> CogVLM2Config:
    """The demo's sizes with a 5-head vision encoder: its heads do not divide tensor_parallel_size=2."""
    demo = resolve_model("demo").config
    return dataclasses.replace(demo, vision=dataclasses.replace(demo.vision, hidden_size=80, num_heads=5,
                                                                intermediate_size=160))


def test_vision_heads_that_do_not_divide_replicate_the_encoder():
    config = _odd_vision_config()
    layout = shard_layout(config, 2, 1)
    assert layout.vision_data_parallel and layout.heads.size == 2  # the language model still shards
    assert not shard_layout(resolve_model("demo").config, 2, 0).vision_data_parallel
    assert shard_layout(resolve_model("demo").config, 2, 0, mm_encoder_tp_mode="data").vision_data_parallel
    weight = np.zeros((3 * 80, 80), np.float32)
    name = "model.vision.transformer.layers.0.attention.query_key_value.weight"
    assert shard_tensor(name, weight, config, layout) is weight


def test_sharded_vision_biases_after_the_reduction_are_held_by_rank_zero():
    c = resolve_model("demo").config
    bias = np.ones(96, np.float32)
    for name in ("model.vision.transformer.layers.0.attention.dense.bias",
                 "model.vision.transformer.layers.0.mlp.fc2.bias"):
        assert shard_tensor(name, bias, c, shard_layout(c, 2, 0)) is bias
        assert not shard_tensor(name, bias, c, shard_layout(c, 2, 1)).any()


def test_missing_msrun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MsrunNotFoundError, match="msrun"):
        LLM("demo", tensor_parallel_size=2)


# ---- two workers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp_llm():
    # a small token budget: image prompts are prefilled in chunks, some steps sample nothing
    llm = LLM("demo", tensor_parallel_size=2, max_num_batched_tokens=48)
    yield llm
    llm.shutdown()
    _assert_group_gone(llm.engine.executor)


def test_each_rank_caches_only_its_kv_heads(tp_llm):
    executor = tp_llm.engine.executor
    slots = tp_llm.stats()["num_total_blocks"] * tp_llm.stats()["block_size"]
    assert executor.kv_cache_shapes == [(slots, 1, 16), (slots, 1, 16)]  # the demo: 2 KV heads of 16


def test_goldens_through_python_api(tp_llm, golden_cases, goldens):
    outs = tp_llm.generate([golden_prompt(c) for c in golden_cases], [greedy_params(c) for c in golden_cases], use_tqdm=False)
    for case, out in zip(golden_cases, outs):
        assert out.error is None and out.outputs[0].finish_reason == "length"
        assert out.prompt_token_ids == case["input_ids"]
        assert_golden(case, out.outputs[0].token_ids)
    assert_no_leak(tp_llm)
    assert tp_llm.stats()["num_prefill_chunks"] > 0
    examples = goldens["demo"]["examples"]
    prompts = [{"prompt": ex["prompt"], "template": ex["template"],
                **({"image": str(TINY / ex["image"])} if ex["image"] else {})} for ex in examples]
    outs = tp_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for ex, out in zip(examples, outs):
        assert (out.outputs[0].token_ids, out.outputs[0].text) == (ex["token_ids"], ex["text"]), ex
    assert_no_leak(tp_llm)


def test_goldens_through_cli(tmp_path, golden_cases):
    items = [{"prompt": c["query"], "history": c["history"], "template": c["template"],
              "image": str(case_image(c)) if c["image"] else None, "max_tokens": len(c["greedy_tokens"]),
              "ignore_eos": True} for c in golden_cases]
    prompts_file = tmp_path / "cases.jsonl"
    prompts_file.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    result = subprocess.run([str(Path(sys.executable).parent / "cogvlm2"), "generate", "--tensor-parallel-size", "2",
                             "--prompts-file", str(prompts_file)], capture_output=True, text=True, timeout=180,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(golden_cases)
    for case, line in zip(golden_cases, lines):
        assert_golden(case, line["token_ids"])


def test_killed_worker_fails_requests_within_bounded_time(golden_cases):
    llm = LLM("demo", tensor_parallel_size=2)
    executor = llm.engine.executor
    victim = executor.group.pids[1]
    long_run = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    killed_at: list[float] = []

    def kill_after_first_steps() -> None:
        while llm.engine.scheduler.num_steps < 3:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_after_first_steps, daemon=True)
    killer.start()
    with pytest.raises(WorkerFailure, match="died"):
        llm.generate([golden_prompt(c) for c in golden_cases], long_run, use_tqdm=False)
    assert time.monotonic() - killed_at[0] < FAILURE_BOUND_SECONDS
    _assert_group_gone(executor)
    # every outstanding request was failed, its blocks freed; the next step hands out the failed outputs
    outs = llm.engine.step()
    assert len(outs) == len(golden_cases)
    assert all(o.finished and o.outputs[0].finish_reason == "error" and "died" in o.error for o in outs)
    assert not llm.engine.has_unfinished_requests()
    assert_no_leak(llm)
    # a dead engine fails new work at once instead of hanging
    start = time.monotonic()
    with pytest.raises(WorkerFailure):
        llm.generate("Hello", SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < 1.0
    llm.shutdown()


@pytest.mark.slow
def test_worker_error_at_start_up_is_reported_not_hung(tmp_path):
    """The driver does not read weights: a checkpoint only the workers find broken fails start-up with their error."""
    (tmp_path / "config.json").write_bytes((REPO / "cogvlm2" / "demo_model" / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"start-up failed: tensor-parallel worker rank \d failed: SafetensorError"):
        LLM(str(tmp_path), tensor_parallel_size=2)
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_hung_worker_is_detected_by_missing_heartbeats(monkeypatch):
    import engine.distributed
    monkeypatch.setattr(engine.distributed, "TensorParallelExecutor", functools.partial(
        engine.distributed.TensorParallelExecutor, timeouts=Timeouts(heartbeat=3.0)))
    engine_ = LLMEngine("demo", tensor_parallel_size=2)
    executor = engine_.executor
    engine_.add_request("a", "Hello", SamplingParams(max_tokens=64, ignore_eos=True))
    engine_.step()
    os.kill(executor.group.pids[0], signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match="heartbeat"):
        while engine_.has_unfinished_requests():
            engine_.step()
    assert time.monotonic() - start < 3.0 + FAILURE_BOUND_SECONDS
    _assert_group_gone(executor)


@pytest.mark.slow
@pytest.mark.parametrize("engine_kwargs, margin", [
    # The demo has 2 KV heads: with 4 ranks each KV head is cached by two ranks.
    ({"tensor_parallel_size": 4}, 1e-3),
    # Every rank holds the whole vision encoder and encodes its share of a step's images.
    ({"tensor_parallel_size": 2, "mm_encoder_tp_mode": "data"}, 1e-3),
    # bf16 weights, GEMMs and KV on each rank, against the bf16 margin rule.
    ({"tensor_parallel_size": 2, "dtype": "bfloat16"}, 0.05),
], ids=["four-workers", "data-parallel-vision", "bfloat16"])
def test_tensor_parallel_variants_match_goldens(golden_cases, engine_kwargs, margin):
    with LLM("demo", **engine_kwargs) as llm:
        if "dtype" in engine_kwargs:
            assert llm.stats()["dtype"] == engine_kwargs["dtype"]
        outs = llm.generate([golden_prompt(c) for c in golden_cases], [greedy_params(c) for c in golden_cases],
                            use_tqdm=False)
        for case, out in zip(golden_cases, outs):
            limit = margin_limit(case["greedy_top2_margin"], margin)
            assert out.outputs[0].token_ids[:limit] == case["greedy_tokens"][:limit], case["name"]
        assert_no_leak(llm)


@pytest.mark.slow
def test_odd_vision_head_count_serves_under_tensor_parallel_2(tmp_path):
    """A 5-head encoder (refused before) runs replicated; the tokens equal the single-process run's."""
    from cogvlm2.weights import make_random_checkpoint
    make_random_checkpoint(_odd_vision_config(), tmp_path / "odd", seed=3)
    prompts = [{"prompt": "Describe the image.", "image": str(TINY / f"demo_{i}.png")} for i in range(3)]
    prompts.append("Hello")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(str(tmp_path / "odd")) as single:
        expected = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    with LLM(str(tmp_path / "odd"), tensor_parallel_size=2) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected

