"""Property tests (hypothesis): random sampling parameters in batches with good requests, and random add / abort /
step workloads against the scheduler and block manager. The default profile keeps each within seconds; the slow
set runs the `long` profile (HYPOTHESIS_PROFILE=long, or the slow-marked twins below)."""
from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_no_leak as assert_engine_has_no_leak
from engine.config import EngineArgs
from test_scheduler import FakeEngine, assert_no_leak, make_scheduler, make_seq

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
LONG = settings(max_examples=400)

# ---- sampling parameters ------------------------------------------------------------------------------------------
NOT_A_NUMBER = st.sampled_from(["1", None, [1], True, float("nan"), float("inf"), -float("inf"), 1e39, 10 ** 400])
NOT_AN_INT = st.sampled_from(["1", 1.5, None, True, [1]])
NOT_A_BOOL = st.sampled_from([0, 1, "true", None])
VALID = {
    "temperature": st.floats(0, 3),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 300),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.05, 3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.none() | st.integers(0, 2 ** 70),
    "max_tokens": st.integers(1, 5),
    "stop": st.none() | st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "stop_token_ids": st.none() | st.lists(st.integers(0, 128255), max_size=3),
    "ignore_eos": st.booleans(),
    "logprobs": st.none() | st.integers(0, 5),
    "prompt_logprobs": st.none() | st.integers(0, 3),
    "n": st.integers(1, 3),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
}
INVALID = {
    "temperature": NOT_A_NUMBER | st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
    "top_p": NOT_A_NUMBER | st.sampled_from([0.0, -0.5, 1.0001]),
    "top_k": NOT_AN_INT | st.integers(max_value=-2),
    "min_p": NOT_A_NUMBER | st.sampled_from([-0.1, 1.5]),
    "repetition_penalty": NOT_A_NUMBER | st.sampled_from([0.0, -1.0, 1e-300]),
    "presence_penalty": NOT_A_NUMBER | st.sampled_from([-2.01, 2.5]),
    "frequency_penalty": NOT_A_NUMBER | st.sampled_from([-3.0, 2.01]),
    "seed": NOT_AN_INT.filter(lambda v: v is not None) | st.integers(max_value=-1),
    "max_tokens": NOT_AN_INT.filter(lambda v: v is not None) | st.integers(max_value=0),
    "min_tokens": NOT_AN_INT.filter(lambda v: v is not None) | st.integers(max_value=-1),
    "stop": st.sampled_from([[""], [1], 5, [None], {"a": 1}]),
    "stop_token_ids": st.sampled_from([[-1], ["a"], 3, [1.5], [True]]),
    "ignore_eos": NOT_A_BOOL,
    "logprobs": NOT_AN_INT.filter(lambda v: v is not None) | st.sampled_from([-2, -1, EngineArgs.max_logprobs + 1]),
    "prompt_logprobs": NOT_AN_INT.filter(lambda v: v is not None) | st.sampled_from([-2, -1, 21]),
    "skip_special_tokens": NOT_A_BOOL,
    "include_stop_str_in_output": NOT_A_BOOL,
    "n": st.sampled_from([0, -1, "2", 1.0]),
}


@st.composite
def sampling_params(draw) -> tuple[dict, str | None]:
    """A parameter dict and the field that makes it invalid (None: valid)."""
    chosen = {name: draw(strategy) for name, strategy in VALID.items() if draw(st.booleans())}
    chosen["max_tokens"] = chosen.get("max_tokens", 3)
    chosen["min_tokens"] = draw(st.integers(0, chosen["max_tokens"]))
    bad = draw(st.none() | st.sampled_from(sorted(INVALID)))
    if bad is not None:
        chosen[bad] = draw(INVALID[bad])
    return chosen, bad


@pytest.fixture(scope="module")
def llm():
    from engine import LLM
    with LLM("demo", max_model_len=256) as engine:
        yield engine


@pytest.fixture(scope="module")
def good(llm):
    from engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=4)
    prompts = ["Who are you?", "What can you do?"]
    return prompts, params, [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def _check_batch(llm, good, candidate: tuple[dict, str | None]) -> None:
    params, bad = candidate
    prompts, good_params, alone = good
    outs = llm.generate([prompts[0], "Hello", prompts[1]], [good_params, params, good_params], use_tqdm=False)
    if bad is None:
        assert outs[1].error is None, (params, outs[1].error)
        assert [o.index for o in outs[1].outputs] == list(range(params.get("n", 1)))
        assert all(1 <= len(o.token_ids) <= params["max_tokens"] for o in outs[1].outputs)
    else:
        assert outs[1].outputs[0].finish_reason == "error", params
        assert bad in outs[1].error, (bad, params, outs[1].error)
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert_engine_has_no_leak(llm)


@given(candidate=sampling_params())
def test_random_sampling_params_fail_alone_naming_their_field(llm, good, candidate):
    _check_batch(llm, good, candidate)


@pytest.mark.slow
@LONG
@given(candidate=sampling_params())
def test_random_sampling_params_long(llm, good, candidate):
    _check_batch(llm, good, candidate)


# ---- scheduler and block manager ----------------------------------------------------------------------------------
PROMPT_STEMS = ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [20, 21])  # shared prefixes make cache hits

Op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, len(PROMPT_STEMS) - 1), st.integers(0, 9), st.integers(1, 6),
              st.booleans()),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("step"), st.integers(1, 4)),
)


def _prompt(stem: int, extra: int) -> list[int]:
    return PROMPT_STEMS[stem] + list(range(100, 100 + extra))


def _check_pool(scheduler) -> None:
    """Ref counts are the sequences' references, the free list holds exactly the unreferenced blocks, the prefix
    cache and the blocks agree on hashes, waiting sequences hold no blocks."""
    bm = scheduler.block_manager
    references = [0] * bm.num_total_blocks
    for seq in scheduler.running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for block_id in seq.block_table:
            references[block_id] += 1
    assert [bm.ref_count(b) for b in range(bm.num_total_blocks)] == references
    assert set(bm._free) == {b for b, count in enumerate(references) if count == 0}
    for block_hash, block_id in bm._cached.items():
        assert bm.blocks[block_id].block_hash == block_hash
    assert sum(block.block_hash is not None for block in bm.blocks) == len(bm._cached)
    assert all(not seq.block_table for seq in scheduler.waiting)


def _run_workload(ops, num_blocks: int, block_size: int, budget: int, prefix_caching: bool) -> None:
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching,
                               max_num_batched_tokens=budget, max_num_seqs=4)
    engine = FakeEngine(scheduler)
    added, finished_once = [], {}
    for op in ops:
        if op[0] == "add":
            _, stem, extra, max_tokens, with_image = op
            seq = make_seq(f"r{len(added)}", _prompt(stem, extra), num_image_tokens=4 if with_image else 0,
                           image_hash="img" if with_image else None, max_tokens=max_tokens)
            if scheduler.add_request(seq):
                added.append((seq, stem, extra, max_tokens, with_image))
        elif op[0] == "abort" and added:
            scheduler.abort(added[op[1] % len(added)][0].request_id)
        else:
            for _ in range(op[1]):
                if scheduler.has_unfinished():
                    engine.step()
        _check_pool(scheduler)
        for seq, *_ in added:
            if seq.is_finished:
                finished_once.setdefault(seq.request_id, seq.finish_reason)
                assert seq.finish_reason == finished_once[seq.request_id]  # finished once, and stays so
    for _ in range(10_000):
        if not scheduler.has_unfinished():
            break
        engine.step()
        _check_pool(scheduler)
    assert not scheduler.has_unfinished()
    assert_no_leak(scheduler)
    for seq, stem, extra, max_tokens, with_image in added:
        assert seq.is_finished, seq.request_id  # none lost
        if seq.finish_reason == "length":  # not aborted: the tokens of a run alone in the same pool
            solo = make_seq("solo", _prompt(stem, extra), num_image_tokens=4 if with_image else 0,
                            image_hash="img" if with_image else None, max_tokens=max_tokens)
            FakeEngine(make_scheduler(num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching,
                                      max_num_batched_tokens=budget)).run([solo])
            assert seq.output_token_ids == solo.output_token_ids, seq.request_id


WORKLOAD = dict(ops=st.lists(Op, max_size=40), num_blocks=st.integers(6, 40), block_size=st.sampled_from([1, 2, 4]),
                budget=st.integers(4, 24), prefix_caching=st.booleans())


@given(**WORKLOAD)
def test_random_workloads_keep_the_pool_consistent(ops, num_blocks, block_size, budget, prefix_caching):
    _run_workload(ops, num_blocks, block_size, budget, prefix_caching)


@pytest.mark.slow
@LONG
@given(**WORKLOAD)
def test_random_workloads_long(ops, num_blocks, block_size, budget, prefix_caching):
    _run_workload(ops, num_blocks, block_size, budget, prefix_caching)


def test_profiles_are_bounded():
    assert settings.get_profile("default").max_examples <= 50 and not math.isinf(LONG.max_examples)
