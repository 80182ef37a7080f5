"""vLLM's Python API: a vLLM-style client (tests/clients/vllm_style_app.py) unchanged but for the import, output
kinds, AsyncLLM's loading and event loops, LLM.chat, prompt_token_ids and multi_modal_data."""
from __future__ import annotations

import asyncio
import importlib.util
import threading

import pytest
from fastapi.testclient import TestClient

from conftest import TINY
from engine import LLM, AsyncLLM, RequestOutputKind, SamplingParams

IMAGE = str(TINY / "demo_0.png")
CLIENT = TINY.parents[1] / "clients" / "vllm_style_app.py"
ARGS = dict(max_model_len=256)


def _load_client(monkeypatch):
    monkeypatch.setenv("CLIENT_IMAGE", IMAGE)
    spec = importlib.util.spec_from_file_location("vllm_style_app", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def offline():
    with LLM("demo", **ARGS) as llm:
        yield llm


def test_the_vllm_style_client_runs_unchanged_but_for_the_import(monkeypatch, offline):
    client = _load_client(monkeypatch)
    question = {"prompt": "How many shapes are there?", "image": IMAGE}
    expected = offline.generate(question, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    story = offline.generate("Tell me a story.", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    hello_ids = offline.get_tokenizer().encode("Hello")
    hello = offline.generate({"prompt_token_ids": hello_ids}, SamplingParams(temperature=0, max_tokens=12),
                             use_tqdm=False)[0]
    with TestClient(client.app) as http:  # runs the lifespan: AsyncLLM created inside the running loop
        answer = http.post("/generate", json={"prompt": "How many shapes are there?"}).json()
        assert answer == {"text": expected.outputs[0].text, "finish_reason": "length" if len(
            expected.outputs[0].token_ids) == 16 else expected.outputs[0].finish_reason,
            "num_tokens": len(expected.outputs[0].token_ids)}
        assert http.post("/stream", json={"prompt": "Tell me a story.", "max_tokens": 12}).text == \
            story.outputs[0].text
        assert http.post("/stream_deltas", json={"prompt_token_ids": hello_ids, "max_tokens": 12}).text == \
            hello.outputs[0].text
        assert http.post("/count_tokens", json={"text": "Hello"}).json() == {"count": len(hello_ids)}
    chat_text, more_text = client.offline_chat()
    assert chat_text == expected.outputs[0].text == "two"
    assert more_text == offline.generate({"prompt_token_ids": hello_ids}, SamplingParams(temperature=0, max_tokens=4),
                                         use_tqdm=False)[0].outputs[0].text


def _outputs(llm: AsyncLLM, kind: RequestOutputKind) -> list:
    async def main():
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=kind)
        return [out async for out in llm.generate("Hello", params)]
    return asyncio.run(main())


def test_output_kinds():
    llm = AsyncLLM("demo", **ARGS)
    try:
        cumulative = _outputs(llm, RequestOutputKind.CUMULATIVE)
        delta = _outputs(llm, RequestOutputKind.DELTA)
        final = _outputs(llm, RequestOutputKind.FINAL_ONLY)
    finally:
        llm.shutdown()
    # steps that finish while the caller is busy arrive as one output: counts grow, by one or more
    lengths = [len(o.outputs[0].token_ids) for o in cumulative]
    assert lengths == sorted(set(lengths)) and lengths[-1] == 6
    assert all(a.outputs[0].text == b.outputs[0].text[:len(a.outputs[0].text)] for a, b in zip(cumulative,
                                                                                              cumulative[1:]))
    assert sum(len(o.outputs[0].token_ids) for o in delta) == 6
    assert "".join(o.outputs[0].text for o in delta) == cumulative[-1].outputs[0].text
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == cumulative[-1].outputs[0].token_ids
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="DELTA")


def test_constructor_in_a_running_loop_does_not_wait_for_the_model(monkeypatch):
    import engine.llm_engine as llm_engine
    release = threading.Event()
    real_init = llm_engine.LLMEngine.__init__

    def slow_init(self, *args, **kwargs):
        assert release.wait(30)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(llm_engine.LLMEngine, "__init__", slow_init)

    async def main():
        llm = AsyncLLM("demo", **ARGS)  # returns while the engine thread is held in slow_init
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        ticker = asyncio.ensure_future(tick())
        asyncio.get_running_loop().call_later(0.2, release.set)
        out = [o async for o in llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0))]
        ticker.cancel()
        assert out[-1].finished and ticks >= 10  # the loop ran while the model loaded
        return llm
    llm = asyncio.run(main())
    llm.shutdown()


def test_created_on_one_loop_and_used_on_another_after_it_ends():
    async def create():
        return await AsyncLLM.create("demo", **ARGS)
    llm = asyncio.run(create())  # this loop ends here
    try:
        for _ in range(2):
            outs = asyncio.run(_collect(llm))
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()
        llm.shutdown()  # idempotent, and a plain method
    assert not llm.is_running


async def _collect(llm):
    return [o async for o in llm.generate("Hi", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]


def test_a_model_that_fails_to_load_raises_from_ready_and_generate():
    async def main():
        llm = AsyncLLM("no-such-model-preset")
        with pytest.raises(Exception, match="no-such-model-preset"):
            await llm.ready()
        with pytest.raises(Exception, match="no-such-model-preset"):
            await anext(llm.generate("Hi"))
        llm.shutdown()
    asyncio.run(main())
    with pytest.raises(Exception, match="no-such-model-preset"):
        AsyncLLM("no-such-model-preset")  # outside a loop: the constructor raises


def test_prompt_forms(offline):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    processor = offline.engine.processor
    with_image = offline.generate({"prompt": "Describe the image.", "image": IMAGE}, params, use_tqdm=False)[0]
    as_media = offline.generate({"prompt": "Describe the image.", "multi_modal_data": {"image": IMAGE}}, params,
                                use_tqdm=False)[0]
    ids = processor("Describe the image.").input_ids  # BOS + the chat template's text, no image
    as_ids = offline.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": IMAGE}}, params,
                              use_tqdm=False)[0]
    assert as_media.outputs[0].token_ids == with_image.outputs[0].token_ids == as_ids.outputs[0].token_ids
    assert as_ids.prompt_token_ids == with_image.prompt_token_ids and as_ids.prompt is None
    bad = offline.generate([{"prompt": "a", "prompt_token_ids": [1]}, {"prompt_token_ids": []},
                            {"prompt_token_ids": ids[1:], "multi_modal_data": {"image": IMAGE}},
                            {"prompt": "a", "image": IMAGE, "multi_modal_data": {"image": IMAGE}},
                            {"prompt": "a", "multi_modal_data": {"audio": b""}},
                            {"prompt_token_ids": ids, "history": [("q", "a")]}], params, use_tqdm=False)
    errors = [o.error for o in bad]
    for error, expected in zip(errors, ["exactly one of", "prompt_token_ids", "must start with BOS", "both 'image'",
                                        "multi_modal_data", "need 'prompt'"]):
        assert error is not None and expected in error, (expected, error)


def test_chat_matches_the_prompt_dict_and_takes_batches(offline):
    params = SamplingParams(temperature=0, max_tokens=8)
    history = [{"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "two"},
               {"role": "user", "content": [{"type": "text", "text": "Describe the image."},
                                            {"type": "image_url", "image_url": {"url": f"file://{IMAGE}"}}]}]
    expected = offline.generate({"prompt": "Describe the image.", "image": IMAGE,
                                 "history": [("How many shapes are there?", "two")]}, params, use_tqdm=False)[0]
    one, two = offline.chat([history, [{"role": "user", "content": "Hi"}]], params, use_tqdm=False)
    assert one.outputs[0].token_ids == expected.outputs[0].token_ids
    assert two.outputs[0].text == offline.generate("Hi", params, use_tqdm=False)[0].outputs[0].text
    with pytest.raises(ValueError, match="remote URLs"):
        offline.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}])
