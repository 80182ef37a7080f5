"""AsyncLLM: streamed deltas, concurrent callers, the event loop never blocked, aborts freeing KV blocks, bad input
failing alone, shutdown and engine crashes failing waiting callers instead of hanging."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import time

import pytest

from conftest import TINY
from engine import LLM, AsyncLLM, RequestOutputKind
from engine.async_llm import EngineDeadError

ENGINE_ARGS = dict(max_model_len=256, max_num_seqs=32)
IMAGE = str(TINY / "demo_0.png")
LONG = {"max_tokens": 200, "ignore_eos": True, "output_kind": RequestOutputKind.DELTA}


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM("tiny", **ENGINE_ARGS)
    yield engine
    engine.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def collect(llm: AsyncLLM, prompt, params, request_id=None) -> list:
    """The request's deltas (output_kind DELTA)."""
    params = {**(params or {}), "output_kind": RequestOutputKind.DELTA}
    return [delta async for delta in llm.generate(prompt, params, request_id)]


async def wait_all_blocks_free(llm: AsyncLLM, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = llm.stats()
        if stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_running"] == 0 \
                and stats["num_waiting"] == 0:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"KV blocks not freed: {llm.stats()}")


def test_deltas_add_up_to_the_offline_result(llm):
    prompts = [{"prompt": "Describe the image.", "image": IMAGE}, "What is a circle?"]
    params = [{"max_tokens": 12, "temperature": 0.0, "ignore_eos": True},
              {"max_tokens": 12, "temperature": 1.0, "seed": 7, "ignore_eos": True, "logprobs": 2}]
    offline = LLM("tiny", **ENGINE_ARGS)
    for prompt, sp in zip(prompts, params):
        expected = offline.generate(prompt, sp, use_tqdm=False)[0]
        deltas = run(collect(llm, prompt, sp))
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert all(d.outputs[0].finish_reason is None for d in deltas[:-1])
        assert deltas[-1].outputs[0].finish_reason == "length"
        assert "".join(d.outputs[0].text for d in deltas) == expected.outputs[0].text
        assert sum((d.outputs[0].token_ids for d in deltas), []) == expected.outputs[0].token_ids
        if sp.get("logprobs"):
            logprobs = sum((d.outputs[0].logprobs for d in deltas), [])
            assert logprobs == expected.outputs[0].logprobs
        assert deltas[-1].prompt_token_ids == expected.prompt_token_ids


def test_concurrent_callers_and_a_responsive_event_loop(llm):
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        results = await asyncio.gather(*(
            collect(llm, {"prompt": f"Question {i}?", "image": IMAGE if i % 2 else None},
                    {"max_tokens": 5 + i % 4, "ignore_eos": True}, request_id=f"c{i}") for i in range(24)))
        stop.set()
        await tick
        return results

    results = run(main())
    for i, deltas in enumerate(results):
        assert {d.request_id for d in deltas} == {f"c{i}"}
        assert sum(d.finished for d in deltas) == 1 and deltas[-1].finished
        assert sum(len(d.outputs[0].token_ids) for d in deltas) == 5 + i % 4
    # The model runs in the engine thread: the loop keeps ticking every few ms while 24 requests generate.
    assert max(gaps) < 0.25, f"event loop blocked for {max(gaps):.3f} s"
    run(wait_all_blocks_free(llm))


def test_closing_the_generator_aborts_and_frees_blocks(llm):
    async def main():
        deltas = llm.generate("Tell me a long story.", LONG)
        seen = [await anext(deltas) for _ in range(3)]
        assert llm.stats()["num_free_blocks"] < llm.stats()["num_total_blocks"]
        await deltas.aclose()
        stats = await wait_all_blocks_free(llm)
        return seen, stats

    seen, stats = run(main())
    assert not any(d.finished for d in seen)


def test_breaking_out_of_the_loop_aborts(llm):
    async def main():
        async for delta in llm.generate("Tell me a long story.", LONG, request_id="breaker"):
            if len(delta.outputs[0].token_ids) or delta.outputs[0].text:
                break
        gc.collect()  # the abandoned generator is closed by the loop's async-generator finaliser
        return await wait_all_blocks_free(llm)

    run(main())


def test_cancelling_the_caller_task_aborts(llm):
    async def main():
        first = asyncio.Event()

        async def consume():
            async for _ in llm.generate("Tell me a long story.", LONG):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return await wait_all_blocks_free(llm)

    run(main())


def test_abort_by_request_id_ends_the_stream(llm):
    async def main():
        deltas = []
        async for delta in llm.generate("Tell me a long story.", LONG, request_id="to-abort"):
            deltas.append(delta)
            if len(deltas) == 2:
                await llm.abort("to-abort")
        return deltas

    deltas = run(main())
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "abort"
    assert len(deltas) < LONG["max_tokens"]
    run(wait_all_blocks_free(llm))


def test_bad_input_fails_only_its_request(llm):
    async def main():
        return await asyncio.gather(
            collect(llm, {"prompt": "Hi", "image": str(TINY / "missing.png")}, None),
            collect(llm, "Hi", {"temperature": -1}),
            collect(llm, {"prompt": "Hi", "bogus": 1}, None),
            collect(llm, "Hi", {"max_tokens": 4, "ignore_eos": True}))

    missing, bad_params, bad_keys, good = run(main())
    for deltas, needle in ((missing, "not found"), (bad_params, "temperature"), (bad_keys, "bogus")):
        assert len(deltas) == 1 and deltas[0].finished
        assert deltas[0].outputs[0].finish_reason == "error" and needle in deltas[0].error
    assert good[-1].outputs[0].finish_reason == "length"
    assert sum(len(d.outputs[0].token_ids) for d in good) == 4


def test_request_ids_are_unique_while_open_and_reusable_after(llm):
    async def main():
        first = llm.generate("Tell me a long story.", LONG, request_id="same")
        await anext(first)
        with pytest.raises(ValueError, match="already in use"):
            await anext(llm.generate("Hi", None, request_id="same"))
        await first.aclose()
        # Reused at once, while the engine may still hold the aborted request: its late outputs must not leak in.
        results = []
        for _ in range(4):
            deltas = await collect(llm, "Hi", {"max_tokens": 3, "ignore_eos": True}, request_id="same")
            results.append(deltas)
            again = llm.generate("Tell me a long story.", LONG, request_id="same")
            await anext(again)
            await again.aclose()
        return results

    for deltas in run(main()):
        assert {d.request_id for d in deltas} == {"same"}
        assert deltas[-1].outputs[0].finish_reason == "length"
        assert sum(len(d.outputs[0].token_ids) for d in deltas) == 3
    run(wait_all_blocks_free(llm))


def test_step_listener_sees_every_step_and_stats(llm):
    seen: list[tuple[str, int, bool]] = []
    llm.add_step_listener(lambda outputs, now: seen.extend(
        (o.request_id, len(o.outputs[0].token_ids), o.finished) for o in outputs))
    llm.add_step_listener(lambda outputs, now: 1 / 0)  # a failing observer must not hurt the engine
    run(collect(llm, "Hi", {"max_tokens": 6, "ignore_eos": True}, request_id="observed"))
    mine = [s for s in seen if s[0].startswith("observed-")]  # the engine's id for the request
    assert [n for _, n, _ in mine] == [1] * 6  # deltas: the one token each step generated
    assert [f for _, _, f in mine] == [False] * 5 + [True]
    stats = llm.stats()
    assert {"num_total_blocks", "num_free_blocks", "num_running", "num_waiting", "num_preemptions",
            "prefix_cache_hit_tokens", "prefix_cache_queried_tokens"} <= set(stats)
    assert llm.is_running


def test_shutdown_fails_waiting_callers_instead_of_hanging():
    async def main():
        async with AsyncLLM("tiny", **ENGINE_ARGS) as llm:
            deltas = llm.generate("Tell me a long story.", LONG)
            await anext(deltas)
            waiting = asyncio.create_task(collect(llm, "Another story.", LONG))
            await asyncio.sleep(0.05)
            llm.shutdown()
            with pytest.raises(EngineDeadError, match="shut down"):
                async for _ in deltas:
                    pass
            with pytest.raises(EngineDeadError):
                await waiting
            with pytest.raises(EngineDeadError):
                await anext(llm.generate("Hi"))
            assert not llm.is_running

    run(main())


def test_engine_crash_fails_every_waiting_caller():
    llm = AsyncLLM("tiny", **ENGINE_ARGS)
    real_step = llm.engine.step
    calls = []

    def crashing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return real_step()

    llm.engine.step = crashing_step

    async def main():
        results = await asyncio.gather(*(collect(llm, f"Story {i}", LONG) for i in range(4)),
                                       return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) and "boom" in str(r) for r in results), results
        with pytest.raises(EngineDeadError, match="crashed"):
            await anext(llm.generate("Hi"))
        assert not llm.is_running
        llm.shutdown()  # still clean after a crash

    run(main())
