"""The server's vLLM surface in process (httpx over ASGI): /tokenize, /detokenize, /version, X-Request-Id, CORS,
the API key from the environment and on /v1 only (/metrics open unless --metrics-require-key)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from engine.async_llm import AsyncLLM
from engine.entrypoints.api_server import build_app, package_version
from engine.entrypoints.settings import API_KEY_ENV, ServerSettings

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM("demo", max_model_len=256)
    yield engine
    engine.shutdown()


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await http.request(method, path, **kwargs)
    return asyncio.run(main())


@pytest.fixture(scope="module")
def app(llm):
    return build_app(llm, ServerSettings(model_name="demo"))


def test_tokenize_and_detokenize_round_trip(app, llm):
    prompt = "Question: What is a circle? Answer:"
    body = call(app, "POST", "/tokenize", json={"prompt": prompt, "return_token_strs": True}).json()
    expected = llm.processor(prompt, template="base").input_ids
    assert body["tokens"] == expected and body["count"] == len(expected) and body["max_model_len"] == 256
    assert "".join(body["token_strs"][1:]) == prompt
    bare = call(app, "POST", "/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert bare["tokens"] == expected[1:]
    assert call(app, "POST", "/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": prompt}
    chat = call(app, "POST", "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == llm.processor("Hi").input_ids  # the chat template, as the chat endpoint builds it


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "colour": 1}, "colour"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": "12"}, "tokens"),
])
def test_tokenize_bad_input_is_a_400_naming_the_field(app, path, body, param):
    response = call(app, "POST", path, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_version(app):
    assert call(app, "GET", "/version").json() == {"version": package_version()}
    assert package_version() != "unknown"  # installed in the venv (pip install -e)


def test_request_id_is_honoured_and_echoed(app):
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = call(app, "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123" and response.json()["id"] == "chatcmpl-abc-123"
    again = call(app, "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "abc-123"})
    assert again.status_code == 200  # a reused id is fine: the engine's own id stays unique
    generated = call(app, "GET", "/health").headers["x-request-id"]
    assert len(generated) == 32


def test_cors_defaults_and_a_restricted_origin(llm, app):
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    response = call(app, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
    strict = build_app(llm, ServerSettings(model_name="demo", allowed_origins=["https://ok.example"]))
    assert call(strict, "OPTIONS", "/v1/models", headers=preflight).status_code == 400
    allowed = call(strict, "GET", "/version", headers={"Origin": "https://ok.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://ok.example"


def test_api_key_from_the_environment_on_v1_only(llm, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    app = build_app(llm, ServerSettings(model_name="demo"))
    assert call(app, "GET", "/v1/models").status_code == 401
    assert call(app, "GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    for path in ("/metrics", "/health", "/version"):
        assert call(app, "GET", path).status_code == 200, path
    assert call(app, "POST", "/tokenize", json={"prompt": "hi"}).status_code == 200
    guarded = build_app(llm, ServerSettings(model_name="demo", metrics_require_key=True))
    assert call(guarded, "GET", "/metrics").status_code == 401
    assert call(guarded, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
