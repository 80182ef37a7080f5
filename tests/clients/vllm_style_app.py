"""A client written against vLLM's documented API (AsyncLLM in a FastAPI lifespan, cumulative streaming, LLM.chat,
multi_modal_data, prompt_token_ids). Only the import block differs from the vLLM original; tests/test_vllm_api.py
runs it. Nothing here may use this project's own names."""
from __future__ import annotations

import base64
import os
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

# --- the only lines that differ from the vLLM version ---------------------------------------------------------------
# from vllm import LLM, SamplingParams
# from vllm.engine.arg_utils import AsyncEngineArgs
# from vllm.sampling_params import RequestOutputKind
# from vllm.v1.engine.async_llm import AsyncLLM
from engine import LLM, AsyncEngineArgs, AsyncLLM, RequestOutputKind, SamplingParams
# ---------------------------------------------------------------------------------------------------------------------

MODEL = os.environ.get("CLIENT_MODEL", "demo")
IMAGE = os.environ["CLIENT_IMAGE"]
engine: AsyncLLM | None = None


@asynccontextmanager
async def lifespan(app: FastAPI):
    global engine
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=MODEL, max_model_len=256))
    yield
    engine.shutdown()


app = FastAPI(lifespan=lifespan)


@app.post("/generate")
async def generate(request: Request) -> JSONResponse:
    body = await request.json()
    params = SamplingParams(temperature=0, max_tokens=body.get("max_tokens", 16))
    prompt = {"prompt": body["prompt"], "multi_modal_data": {"image": Image.open(IMAGE)}}
    final = None
    async for output in engine.generate(prompt, params, str(uuid.uuid4())):
        final = output  # cumulative: every output holds the whole completion so far
    return JSONResponse({"text": final.outputs[0].text, "finish_reason": final.outputs[0].finish_reason,
                         "num_tokens": len(final.outputs[0].token_ids)})


@app.post("/stream")
async def stream(request: Request) -> StreamingResponse:
    body = await request.json()
    params = SamplingParams(temperature=0, max_tokens=body.get("max_tokens", 16))

    async def pieces():
        sent = 0
        async for output in engine.generate(body["prompt"], params, str(uuid.uuid4())):
            text = output.outputs[0].text
            yield text[sent:]  # the new part of the cumulative text
            sent = len(text)
    return StreamingResponse(pieces(), media_type="text/plain")


@app.post("/stream_deltas")
async def stream_deltas(request: Request) -> StreamingResponse:
    body = await request.json()
    params = SamplingParams(temperature=0, max_tokens=body.get("max_tokens", 16),
                            output_kind=RequestOutputKind.DELTA)

    async def pieces():
        async for output in engine.generate({"prompt_token_ids": body["prompt_token_ids"]}, params,
                                            str(uuid.uuid4())):
            yield output.outputs[0].text
    return StreamingResponse(pieces(), media_type="text/plain")


@app.post("/count_tokens")
async def count_tokens(request: Request) -> JSONResponse:
    tokenizer = await engine.get_tokenizer()
    return JSONResponse({"count": len(tokenizer.encode((await request.json())["text"]))})


def offline_chat() -> list[str]:
    llm = LLM(model=MODEL, max_model_len=256)
    with open(IMAGE, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    conversation = [{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
    outputs = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=16))
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("Hello")
    more = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=4))
    return [outputs[0].outputs[0].text, more[0].outputs[0].text]
