"""The OpenAI-compatible server as a real process on loopback, driven by the official `openai` client (and raw
httpx where the wire format itself is under test): answers about images, streaming, completions, history, stop
strings, seeds, logprobs, the API key, every bad input's specific 4xx, timeouts, disconnects freeing KV blocks,
and concurrent streaming load."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from PIL import Image

from conftest import TINY
from test_metrics import check_vllm_metrics, sample_values

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 4096
REQUEST_TIMEOUT = 4.0
DESCRIBE_0 = "two shapes on a grey background: a black circle and a purple triangle"  # the demo model's answer


# ---- helpers -----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def running_server(model: str, flags: list[str], log_path: Path) -> Iterator[ServerProcess]:
    port = free_port()
    command = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--disable-access-log", *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"server exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not healthy: {log_path.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield ServerProcess(url, process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_0 = data_url((TINY / "demo_0.png").read_bytes())
IMAGE_1 = data_url((TINY / "demo_1.png").read_bytes())


def user(text: str, *image_urls: str) -> dict[str, Any]:
    if not image_urls:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}] +
            [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]}


def scrape(url: str) -> dict[str, float]:
    return sample_values(httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text)


def wait_until_idle(url: str, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0 and \
                m["vllm:num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"blocks not freed: {m}"
        time.sleep(0.05)


def finished_count(m: dict[str, float], reason: str | None = None) -> float:
    return sum(v for k, v in m.items() if k.startswith("vllm:request_success_total")
               and (reason is None or f'finished_reason="{reason}"' in k))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copy(TINY / "demo_0.png", allowed / "demo_0.png")
    shutil.copy(TINY / "demo_0.png", root / "outside.png")
    (allowed / "escape.png").symlink_to(root / "outside.png")
    return allowed


@pytest.fixture(scope="module")
def demo_url(media_dir, tmp_path_factory) -> Iterator[str]:
    flags = ["--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN), "--allowed-local-media-path",
             str(media_dir), "--max-body-bytes", "1000000", "--max-image-pixels", "250000",
             "--request-timeout", str(REQUEST_TIMEOUT)]
    with running_server("demo", flags, tmp_path_factory.mktemp("logs") / "demo.log") as server:
        yield server.url


@pytest.fixture(scope="module")
def client(demo_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def processor():
    from cogvlm2.processor import CogVLM2Processor
    return CogVLM2Processor.from_pretrained("demo")


# ---- behaviour through the openai client -------------------------------------------------------------------------
def test_chat_with_an_image_gives_the_real_answer(client, processor):
    reply = client.chat.completions.create(model="demo", messages=[user("How many shapes are there?", IMAGE_0)],
                                           max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == "two"
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
    expected_prompt = processor("How many shapes are there?", image=TINY / "demo_0.png").num_tokens
    assert reply.usage.prompt_tokens == expected_prompt
    assert reply.usage.completion_tokens == 1 and reply.object == "chat.completion" and reply.model == "demo"
    other = client.chat.completions.create(model="demo", messages=[user("How many shapes are there?", IMAGE_1)],
                                           max_tokens=16, temperature=0)
    assert other.choices[0].message.content == "three"


def test_streaming_chat_matches_the_non_streamed_reply(client):
    messages = [user("Describe the image.", IMAGE_0)]
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    content_chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == DESCRIBE_0
    assert len([c for c in chunks if c.choices and c.choices[0].finish_reason]) == 1
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    # really streamed: more than one piece (deltas a slow reader has not taken yet are merged, so not one per token)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 5


def test_image_from_a_file_url_under_the_allowed_folder(client, media_dir):
    reply = client.chat.completions.create(
        model="demo", messages=[user("How many shapes are there?", f"file://{media_dir / 'demo_0.png'}")],
        max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == "two"


def test_text_completions_streamed_and_not(client):
    prompt = "Question: What is a circle? Answer:"
    whole = client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6 and whole.choices[0].text
    parts = list(client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"
    default = client.completions.create(model="demo", prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_history_and_system_messages_reach_the_prompt(client, processor):
    history = [("How many shapes are there?", "two"), ("What colour is the background?", "grey")]
    messages = [{"role": "system", "content": "Answer briefly."}]
    for question, answer in history:
        messages += [user(question), {"role": "assistant", "content": answer}]
    messages.append(user("Describe the image.", IMAGE_0))
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, temperature=0)
    system_history = [("Answer briefly.\n" + history[0][0], history[0][1]), history[1]]
    expected = processor("Describe the image.", image=TINY / "demo_0.png", history=system_history).num_tokens
    assert reply.usage.prompt_tokens == expected
    assert expected > processor("Describe the image.", image=TINY / "demo_0.png").num_tokens + 20
    assert reply.choices[0].message.content  # the demo model still answers about the picture
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_stop_strings(client):
    messages = [user("Describe the image.", IMAGE_0)]
    cut = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, temperature=0, stop=":")
    assert cut.choices[0].message.content == DESCRIBE_0.split(":")[0]
    assert cut.choices[0].finish_reason == "stop"
    earliest = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, temperature=0,
                                              stop=["triangle", "grey"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in earliest if c.choices) == "two shapes on a "


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        reply = client.completions.create(model="demo", prompt="Question: Describe a picture. Answer:",
                                          max_tokens=12, temperature=3.0, seed=seed, extra_body={"ignore_eos": True})
        return reply.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1


def test_logprobs(client):
    reply = client.chat.completions.create(model="demo", messages=[user("Describe the image.", IMAGE_0)],
                                           max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    assert "".join(t.token for t in content).strip() == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy picks the most likely token


def test_n_choices_chat_and_streamed(client):
    kwargs = dict(model="demo", messages=[user("Describe the image.", IMAGE_0)], max_tokens=6, temperature=1.0,
                  seed=5, n=4, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" and c.message.content for c in reply.choices)
    assert reply.usage.completion_tokens == 24
    texts = {i: "" for i in range(4)}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i] for i in range(4)] == [c.message.content for c in reply.choices]  # same seeds, same copies


def test_completions_echo_with_logprobs_and_prompt_logprobs(client):
    prompt = "Question: What is a circle? Answer:"
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                      logprobs=2, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    num_prompt = reply.usage.prompt_tokens
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    tokens, values = choice.logprobs.tokens, choice.logprobs.token_logprobs
    assert len(tokens) == num_prompt + 4 and tokens[0] == "<|begin_of_text|>"
    assert values[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in values[1:]) and all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])
    streamed = list(client.completions.create(model="demo", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in streamed) == choice.text
    raw = client.completions.with_raw_response.create(model="demo", prompt=prompt, max_tokens=1,
                                                      extra_body={"prompt_logprobs": 1}).http_response.json()
    entries = raw["prompt_logprobs"]
    assert len(entries) == num_prompt and entries[0] is None
    assert all(1 <= len(e) <= 2 and min(v["rank"] for v in e.values()) == 1 for e in entries[1:])
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model="demo", prompt=prompt, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})


def test_models_health_and_the_api_key(client, demo_url):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert httpx.get(f"{demo_url}/health").json() == {"status": "ok"}  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{demo_url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{demo_url}/metrics").status_code == 200  # Prometheus scrapes without the key, as in vLLM
    keyless = openai.OpenAI(base_url=f"{demo_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.chat.completions.create(model="demo", messages=[user("Hi")], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[user("Hi")], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        client.chat.completions.create(model="demo", messages=[user("Hi", "https://example.com/a.png")])


# ---- bad input: a specific 4xx each, and the server keeps serving --------------------------------------------------
def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [user("How many shapes are there?", IMAGE_0)], "max_tokens": 4, **fields}


BAD_REQUESTS = {
    "malformed json": (b'{"model": "demo", "messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_type"),
    "wrong type max_tokens": (_chat(max_tokens="ten"), 400, "invalid_type"),
    "wrong type messages": (_chat(messages="hello"), 400, "invalid_type"),
    "missing messages": ({"model": "demo"}, 400, "invalid_type"),
    "unknown content part": (_chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400,
                             "invalid_type"),
    "tools": (_chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_field"),
    "suffix": (_chat(suffix="x"), 400, "unsupported_field"),
    "an unknown field": (_chat(temprature=0.5), 400, "unsupported_field"),
    "best_of above n": (_chat(best_of=3), 400, "unsupported"),
    "invalid json schema": (_chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}), 400, "invalid_structured_output"),
    "invalid regex": (_chat(structured_outputs={"regex": "[a-z"}), 400, "invalid_structured_output"),
    "two constraints": (_chat(structured_outputs={"regex": "a"}, guided_choice=["a"]), 400,
                        "invalid_sampling_params"),
    "bad base64": (_chat(messages=[user("Hi", "data:image/png;base64,@@not-base64@@")]), 400, "invalid_base64"),
    "non-image payload": (_chat(messages=[user("Hi", data_url(b"this is plain text, not a picture"))]), 400,
                          "invalid_image"),
    "non-image media type": (_chat(messages=[user("Hi", data_url(b"hello", "text/plain"))]), 400, "invalid_image"),
    "oversized image": (_chat(messages=[user("Hi", data_url(png(600, 600)))]), 400, "image_too_large"),
    "remote url": (_chat(messages=[user("Hi", "http://127.0.0.1:1/cat.png")]), 400, "remote_url_not_supported"),
    "path outside the folder": (_chat(messages=[user("Hi", "file:///etc/passwd")]), 400, "path_not_allowed"),
    "too many images": (_chat(messages=[user("Hi", IMAGE_0, IMAGE_1)]), 400, "too_many_images"),
    "images in two turns": (_chat(messages=[user("Hi", IMAGE_0), {"role": "assistant", "content": "two"},
                                            user("And now?", IMAGE_1)]), 400, "too_many_images"),
    "max_tokens beyond the limit": (_chat(max_tokens=MAX_MODEL_LEN + 1), 400, "max_tokens_too_large"),
    "unknown model": (_chat(model="gpt-4o"), 404, "model_not_found"),
    "negative temperature": (_chat(temperature=-1.0), 400, "invalid_sampling_params"),
    "roles out of order": (_chat(messages=[{"role": "assistant", "content": "Hi"}, user("Hi")]), 400,
                           "invalid_messages"),
    "prompt longer than the context": (_chat(messages=[user("word " * (MAX_MODEL_LEN + 50))]), 400,
                                       "context_length_exceeded"),
    "prompt + max_tokens beyond the context": (_chat(messages=[user("word " * (MAX_MODEL_LEN - 40))], max_tokens=60),
                                               400, "context_length_exceeded"),
    "body too large": (_chat(messages=[user("x" * 1_200_000)]), 413, "request_too_large"),
    "negative seed": (_chat(seed=-1), 400, "invalid_sampling_params"),
    "unreachable min_tokens": ({**_chat(min_tokens=10 ** 6), "max_tokens": None}, 400, "invalid_request"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_specific_4xx(demo_url, case, stream):
    body, status, code = BAD_REQUESTS[case]
    if isinstance(body, dict):
        body = json.dumps({**body, "stream": stream}).encode()
    response = httpx.post(f"{demo_url}/v1/chat/completions", content=body,
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize("url_of", [
    lambda d: f"file://{d / '..' / 'outside.png'}",  # '..' out of the folder
    lambda d: f"file://{d / 'escape.png'}",  # a symlink inside pointing outside
])
def test_local_paths_cannot_escape_the_allowed_folder(client, media_dir, url_of):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=[user("Hi", url_of(media_dir))], max_tokens=2)
    assert caught.value.body["code"] == "path_not_allowed"


@pytest.mark.parametrize("name", ["a%00b.png", "a" * 5000 + ".png"], ids=["nul-byte", "name-too-long"])
def test_unusable_local_paths_are_400s_without_exception_text(demo_url, media_dir, name):
    response = httpx.post(f"{demo_url}/v1/chat/completions", headers=AUTH, timeout=30,
                          json=_chat(messages=[user("Hi", f"file://{media_dir}/{name}")]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image_url" and error["param"] == "image_url"
    assert "Errno" not in error["message"] and "null byte" not in error["message"]


def test_sampling_errors_name_their_field(demo_url):
    response = httpx.post(f"{demo_url}/v1/chat/completions", headers=AUTH, json=_chat(seed=-1), timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    response = httpx.post(f"{demo_url}/v1/chat/completions", headers=AUTH, timeout=30,
                          json={**_chat(min_tokens=10 ** 6), "max_tokens": None})
    assert response.status_code == 400 and "min_tokens" in response.json()["error"]["message"]


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(demo_url, scheme):
    assert httpx.get(f"{demo_url}/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}).status_code == 200
    assert httpx.get(f"{demo_url}/v1/models", headers={"Authorization": f"{scheme} wrong"}).status_code == 401


def test_an_internal_error_is_a_500_with_an_id_and_no_exception_text(caplog):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from engine.entrypoints.api_server import _add_error_handlers
    app = FastAPI()
    _add_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret detail /srv/model")

    response = TestClient(app, raise_server_exceptions=False).get("/boom", headers={"X-Request-Id": "req-42"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and "req-42" in error["message"]
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "secret detail" in caplog.text and "req-42" in caplog.text


def test_other_errors_keep_the_openai_shape(demo_url):
    missing = httpx.get(f"{demo_url}/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    completion = httpx.post(f"{demo_url}/v1/completions", headers=AUTH,
                            json={"model": "demo", "prompt": ["a", "b"]})
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"


# ---- structured outputs ------------------------------------------------------------------------------------------
SHAPES_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["background", "count"],
                 "properties": {"background": {"enum": ["grey", "white", "black", "blue"]},
                                "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "shapes", "schema": SHAPES_SCHEMA,
                                                             "strict": True}}


def _picture(k: int) -> str:
    return data_url((TINY / f"demo_{k}.png").read_bytes())


def _validates(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"background", "count"} and value["background"] in \
        SHAPES_SCHEMA["properties"]["background"]["enum"] and isinstance(value["count"], int)


def test_json_schema_replies_validate_for_every_demo_picture(client):
    for k in range(6):
        reply = client.chat.completions.create(model="demo", messages=[user("Describe the image as JSON.",
                                                                           _picture(k))],
                                               response_format=JSON_SCHEMA_FORMAT, max_tokens=40, temperature=0)
        assert reply.choices[0].finish_reason == "stop" and _validates(reply.choices[0].message.content), k


def test_json_schema_under_16_concurrent_requests_mixed_with_free_ones(client):
    from concurrent.futures import ThreadPoolExecutor

    def ask(k: int):
        kwargs = {"response_format": JSON_SCHEMA_FORMAT} if k % 2 == 0 else {}
        reply = client.chat.completions.create(model="demo", messages=[user("Describe the image as JSON.",
                                                                           _picture(k % 6))],
                                               max_tokens=40, temperature=0.7, seed=k, **kwargs)
        return k, reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    for k, text in replies:
        if k % 2 == 0:
            assert _validates(text), text


def test_regex_and_choice_through_vllm_fields(client):
    regex = client.chat.completions.create(model="demo", messages=[user("How many shapes are there?", IMAGE_0)],
                                           max_tokens=10, temperature=0,
                                           extra_body={"structured_outputs": {"regex": "(one|two|three)"}})
    assert regex.choices[0].message.content in ("one", "two", "three")
    choice = client.chat.completions.create(model="demo", messages=[user("What colour is the background?", IMAGE_0)],
                                            max_tokens=10, temperature=0, extra_body={"guided_choice": ["grey", "red"]})
    assert choice.choices[0].message.content in ("grey", "red")
    completion = client.completions.create(model="demo", prompt="The answer is", max_tokens=8, temperature=0,
                                           extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert completion.choices[0].text in ("yes", "no")


def test_logit_bias_and_vllm_token_fields(client, processor):
    forced = processor.tokenizer.encode(" purple")[0]
    reply = client.chat.completions.create(model="demo", messages=[user("How many shapes are there?", IMAGE_0)],
                                           max_tokens=3, temperature=0, logit_bias={str(forced): 100})
    assert reply.choices[0].message.content.startswith(" purple") or reply.choices[0].message.content.startswith(
        "purple")
    reply = client.chat.completions.create(model="demo", messages=[user("What shapes are in the image?", IMAGE_0)],
                                           max_tokens=12, temperature=0, extra_body={"bad_words": ["circle"]})
    assert "circle" not in reply.choices[0].message.content


def test_an_invalid_schema_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=[user("Hi")], max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
    assert caught.value.body["param"] == "response_format" and "objectx" in caught.value.body["message"]


def test_the_server_still_serves_after_bad_requests(client, demo_url):
    reply = client.chat.completions.create(model="demo", messages=[user("How many shapes are there?", IMAGE_0)],
                                           max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == "two"
    assert httpx.get(f"{demo_url}/health").status_code == 200
    wait_until_idle(demo_url)


# ---- timeouts and disconnects -------------------------------------------------------------------------------------
# outlasts REQUEST_TIMEOUT: the demo model decodes ~900 tokens in ~2 s here
LONG = {"model": "demo", "messages": [user("Describe the image.", IMAGE_0)], "max_tokens": 3800,
        "ignore_eos": True}


def test_client_closing_a_stream_aborts_and_frees_its_blocks(demo_url):
    before = wait_until_idle(demo_url)
    with httpx.Client(headers=AUTH, timeout=30) as http:
        with http.stream("POST", f"{demo_url}/v1/chat/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            data = [line for line in (next(lines) for _ in range(8)) if line.startswith("data: ")]
            assert len(data) >= 3
            during = scrape(demo_url)
            assert during["vllm:num_requests_running"] == 1 and during["vllm:kv_cache_usage_perc"] > 0
        closed_at = time.monotonic()
    after = wait_until_idle(demo_url, timeout=2.0)
    assert time.monotonic() - closed_at < REQUEST_TIMEOUT - 1  # freed by the disconnect, not the timeout
    assert finished_count(after, "abort") == finished_count(before, "abort") + 1


def test_client_giving_up_on_a_non_streamed_request_aborts_it(demo_url):
    before = wait_until_idle(demo_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{demo_url}/v1/chat/completions", headers=AUTH, json=LONG, timeout=0.5)
    after = wait_until_idle(demo_url, timeout=2.0)
    assert finished_count(after, "abort") == finished_count(before, "abort") + 1


def test_request_timeout_aborts_with_503(demo_url):
    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as http:
            async def streamed() -> list[str]:
                async with http.stream("POST", f"{demo_url}/v1/chat/completions",
                                       json={**LONG, "stream": True}) as response:
                    assert response.status_code == 200
                    return [line async for line in response.aiter_lines() if line.startswith("data: ")]

            return await asyncio.gather(http.post(f"{demo_url}/v1/chat/completions", json=LONG), streamed())

    start = time.monotonic()
    whole, events = asyncio.run(main())
    assert REQUEST_TIMEOUT - 0.5 < time.monotonic() - start < REQUEST_TIMEOUT + 5
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "request_timeout"
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "request_timeout"
    wait_until_idle(demo_url)


# ---- load ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory) -> Iterator[ServerProcess]:
    flags = ["--max-model-len", "512", "--log-stats-interval", "1"]
    with running_server("tiny", flags, tmp_path_factory.mktemp("logs") / "tiny.log") as server:
        yield server


def check_stream(lines: list[str], max_tokens: int) -> str:
    """Every SSE event well-formed; returns the stream's id."""
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events), events[:3]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and finishes.count(None) == len(finishes) - 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == max_tokens
    return chunks[0]["id"]


def run_load(url: str, num_requests: int, max_tokens: int) -> None:
    before = scrape(url)
    images = [data_url(p.read_bytes()) for p in sorted(TINY.glob("demo_*.png"))]

    async def one(http: httpx.AsyncClient, i: int) -> str:
        content = user(f"Question number {i}?", images[i % len(images)]) if i % 2 else user(f"Say {i}.")
        payload = {"model": "tiny", "messages": [content], "max_tokens": max_tokens, "ignore_eos": True,
                   "temperature": 1.0, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines()]
        return check_stream(lines, max_tokens)

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=num_requests + 10)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(num_requests)))

    ids = asyncio.run(main())
    assert len(set(ids)) == num_requests  # none lost, none duplicated
    after = wait_until_idle(url)
    assert finished_count(after, "length") - finished_count(before, "length") == num_requests
    assert finished_count(after) - finished_count(before) == num_requests

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("vllm:time_to_first_token_seconds_count") == num_requests
    assert grew("vllm:e2e_request_latency_seconds_count") == num_requests
    assert grew("vllm:inter_token_latency_seconds_count") == num_requests * (max_tokens - 1)
    assert grew("vllm:generation_tokens_total") == num_requests * max_tokens
    assert grew("vllm:prefix_cache_hits_total") > 0  # the image requests share 6 pictures
    assert 0 < grew("vllm:mm_cache_hits_total") < grew("vllm:mm_cache_queries_total")
    assert after["vllm:kv_cache_usage_perc"] == 0
    check_vllm_metrics(httpx.get(f"{url}/metrics").text, "tiny")
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_200_concurrent_streaming_requests(tiny_server):
    # About 10 s here (2 cores, client and server together), so it stays in the default suite.
    run_load(tiny_server.url, num_requests=200, max_tokens=16)
    rates = re.findall(r"engine.metrics: Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: "
                       r"([\d.]+) tokens/s", tiny_server.log_path.read_text())
    assert rates and max(float(rate) for rate in rates) > 0  # the stats line, every second while busy


def test_the_serving_benchmark_script(tiny_server, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "serving.py"), "--url", tiny_server.url,
               "--num-requests", "6", "--concurrency", "3", "--max-tokens", "4", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "request throughput" in result.stdout and "inter-token" in result.stdout
    summary = json.loads(out.read_text())
    assert (summary["completed"], summary["failed"], summary["output_tokens"]) == (6, 0, 24)
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p99"]
    assert 0 < summary["itl_s"]["p50"] <= summary["itl_s"]["p99"]


def test_sigterm_ends_open_streams_and_exits(tiny_server):
    """The last test on this server: it stops it."""
    payload = {"messages": [user("Hi")], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=payload) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            tiny_server.process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "engine_unavailable"
    assert tiny_server.process.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert time.monotonic() - stopped_at < 4  # well before uvicorn's 5 s graceful-shutdown timeout


# ---- in process ---------------------------------------------------------------------------------------------------
def test_a_crashed_engine_answers_503_instead_of_hanging():
    from engine.async_llm import AsyncLLM
    from engine.entrypoints.api_server import build_app
    from engine.entrypoints.settings import ServerSettings

    llm = AsyncLLM("tiny", max_model_len=256)

    def crash():
        raise RuntimeError("boom")

    llm.engine.step = crash
    app = build_app(llm, ServerSettings(model_name="tiny"))
    request = {"messages": [user("Hi")], "max_tokens": 2}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
            first = await http.post("/v1/chat/completions", json=request)
            assert first.status_code == 503 and "boom" in first.json()["error"]["message"]
            again = await http.post("/v1/chat/completions", json={**request, "stream": True})
            assert again.status_code == 503 and again.json()["error"]["code"] == "engine_unavailable"
            assert (await http.get("/health")).status_code == 503
        llm.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=60))
