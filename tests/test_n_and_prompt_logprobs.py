"""n > 1 (copies sharing the prompt's KV blocks, per-copy seeds) and prompt_logprobs (against the goldens)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, golden_prompt
from engine import LLM, SamplingParams

IMAGE = str(TINY / "demo_0.png")
DESCRIBE = {"prompt": "Describe the image.", "image": IMAGE}
SAMPLED = dict(temperature=1.0, top_p=0.95, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # no prefix cache: the copies' sharing is the block manager's, not a cache hit; float32: the goldens' math
    with LLM("demo", max_model_len=256, enable_prefix_caching=False, max_logprobs=-1, dtype="float32") as engine:
        yield engine


def _one(llm, prompt, params):
    return llm.generate(prompt, params, use_tqdm=False)[0]


def _counters(llm) -> tuple[int, int]:
    stats = llm.stats()
    return stats["computed_prompt_tokens"], stats["shared_prompt_tokens"]


def test_n_copies_share_the_prompt_and_count_its_prefill_once(llm):
    block_size = llm.engine.args.block_size
    computed_before, shared_before = _counters(llm)
    out = _one(llm, DESCRIBE, SamplingParams(n=4, seed=11, **SAMPLED))
    computed, shared = (a - b for a, b in zip(_counters(llm), (computed_before, shared_before)))
    num_prompt = len(out.prompt_token_ids)
    num_shared = (num_prompt - 1) // block_size * block_size  # the full blocks before the last prompt token
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 10 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds, different samples
    assert shared == 3 * num_shared
    assert computed == num_prompt + 3 * (num_prompt - num_shared)
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_each_copy_is_reproducible_alone_and_in_any_batch(llm):
    together = _one(llm, DESCRIBE, SamplingParams(n=4, seed=11, **SAMPLED))
    alone = [_one(llm, DESCRIBE, SamplingParams(seed=11 + i, **SAMPLED)).outputs[0].token_ids for i in range(4)]
    assert [o.token_ids for o in together.outputs] == alone
    batch = llm.generate(["Hello", DESCRIBE, {"prompt": "How many?", "image": IMAGE}],
                         [SamplingParams(max_tokens=7, ignore_eos=True), SamplingParams(n=4, seed=11, **SAMPLED),
                          SamplingParams(n=2, temperature=1.0, max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [o.token_ids for o in batch[1].outputs] == alone
    assert len(batch[2].outputs) == 2 and len(batch[0].outputs) == 1


def test_n_greedy_copies_agree_and_abort_ends_them_all(llm):
    greedy = _one(llm, DESCRIBE, SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in greedy.outputs}) == 1
    engine = llm.engine
    engine.add_request("many", DESCRIBE, SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("many")
    outputs = engine.step()
    final = [o for o in outputs if o.request_id == "many"]
    assert len(final) == 1 and final[0].finished
    assert sorted(o.finish_reason for o in final[0].outputs) == ["abort"] * 3
    assert not engine.has_unfinished_requests() and not engine.groups and not engine.requests
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


@pytest.mark.parametrize("case_name", ["text_only", "image_chat"])
def test_prompt_logprobs_equal_the_goldens_probe_logprobs(llm, golden_cases, golden_arrays, case_name):
    case = next(c for c in golden_cases if c["name"] == case_name)
    out = _one(llm, golden_prompt(case), SamplingParams(max_tokens=1, prompt_logprobs=-1))
    prompt_logprobs = out.prompt_logprobs
    assert out.prompt_token_ids == case["input_ids"]
    assert len(prompt_logprobs) == len(case["input_ids"]) and prompt_logprobs[0] is None
    probe_ids = golden_arrays[f"{case_name}.probe_ids"].tolist()
    expected = golden_arrays[f"{case_name}.probe_logprobs"]  # [position, probe]: predicts token position + 1
    for position, entries in enumerate(prompt_logprobs[1:]):
        got = [entries[t].logprob for t in probe_ids]
        np.testing.assert_allclose(got, expected[position], atol=1e-3, err_msg=f"{case_name} position {position}")
        token = case["input_ids"][position + 1]
        assert list(entries)[0] == token  # the prompt token first, then every token by rank
        assert sorted(e.rank for t, e in entries.items() if t != token)[:3] == [1, 2, 3]


def test_prompt_logprobs_top_k_same_in_chunks_and_after_a_cached_prefix():
    params = SamplingParams(max_tokens=2, prompt_logprobs=2, temperature=0)
    with LLM("demo", max_model_len=256) as whole, \
            LLM("demo", max_model_len=256, max_num_batched_tokens=8) as chunked:  # 5 prefill steps
        reference = _one(whole, DESCRIBE, params)
        _one(whole, DESCRIBE, SamplingParams(max_tokens=1))  # the prompt's blocks are now in the prefix cache
        again = _one(whole, DESCRIBE, params)
        in_chunks = _one(chunked, DESCRIBE, params)
    for out in (again, in_chunks):
        assert len(out.prompt_logprobs) == len(reference.prompt_logprobs)
        for got, want in zip(out.prompt_logprobs[1:], reference.prompt_logprobs[1:]):
            assert list(got) == list(want) and len(got) in (2, 3)
            np.testing.assert_allclose([e.logprob for e in got.values()], [e.logprob for e in want.values()],
                                       atol=1e-4)
            assert [e.rank for e in got.values()] == [e.rank for e in want.values()]
        assert out.outputs[0].token_ids == reference.outputs[0].token_ids


def test_logprobs_beyond_max_logprobs_fail_alone():
    with LLM("demo", max_model_len=256, max_logprobs=3) as llm:
        outs = llm.generate(["Hello", "Hi"], [SamplingParams(max_tokens=2, logprobs=4),
                                              SamplingParams(max_tokens=2, prompt_logprobs=-1)], use_tqdm=False)
        assert "logprobs=4 is more than this engine's max_logprobs=3" in outs[0].error
        assert "prompt_logprobs=-1" in outs[1].error
        ok = _one(llm, "Hello", SamplingParams(max_tokens=2, logprobs=3))
        assert ok.error is None and len(ok.outputs[0].logprobs[0]) in (3, 4)
