"""Offline batch generation: `LLM(model=...).generate(prompts, sampling_params)` and `.chat(messages, ...)`."""
from __future__ import annotations

import itertools
from typing import Any
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from cogvlm2.chat import conversation_from_messages
from cogvlm2.errors import UnreadableImageError
from engine.entrypoints.media import data_url_bytes
from engine.entrypoints.protocol import ApiError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, accumulate
from engine.sampling_params import SamplingParams

Prompt = str | dict


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any):
        """`kwargs`: any EngineArgs field (engine/config.py), e.g. max_num_seqs=64, kernels="cpu"."""
        self.engine = LLMEngine(model, **kwargs)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any (also done at exit). Idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """OpenAI-style messages (one conversation, or a list of them) -> one output each, through the message
        conversion the server uses. Image parts: data: URLs, file:// URLs or local paths (nothing is fetched).
        CogVLM2's prompt template is fixed by the model: a chat_template is refused, add_generation_prompt is
        always in effect (the template ends with the answer tag)."""
        if chat_template is not None or not add_generation_prompt:
            raise ValueError("chat_template / add_generation_prompt=False: CogVLM2's prompt template is fixed by "
                             "the model (its config's template_version)")
        conversations = [messages] if not messages or isinstance(messages[0], dict) else list(messages)
        return self.generate([_chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. A bad prompt or parameter fails that request only (`error` set)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        request_ids = [f"gen-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for request_id, prompt, sp in zip(request_ids, prompts, params):
                self.engine.add_request(request_id, prompt, sp)
                added.append(request_id)
        except BaseException:  # the call fails as a whole: none of its requests stays in the engine
            for request_id in added:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Accumulates each request's deltas into one output, once."""
        wanted = set(request_ids)
        outputs: dict[str, RequestOutput] = {}
        num_finished = 0
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while num_finished < len(wanted) and self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    if delta.request_id not in wanted:
                        continue
                    accumulate(outputs, delta)
                    if delta.finished:
                        num_finished += 1
                        bar.update(1)
        return [outputs[r] for r in request_ids]

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()


def _per_prompt(sampling_params, count: int) -> list:
    if sampling_params is None or not isinstance(sampling_params, (list, tuple)):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(f"sampling_params has {len(sampling_params)} entries for {count} prompts")
    return list(sampling_params)


def _chat_prompt(messages: list[dict]) -> dict:
    conversation = conversation_from_messages(messages)
    prompt: dict[str, Any] = {"prompt": conversation.query, "history": conversation.history or None}
    if conversation.image_url is not None:
        prompt["image"] = _local_image(conversation.image_url)
    return prompt


def _local_image(url: str) -> bytes | str:
    """An image part's URL as what the processor reads: the bytes of a data: URL, else a local path."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        try:
            return data_url_bytes(url)
        except ApiError as e:
            raise UnreadableImageError(f"image_url: {e.message}") from e
    if scheme == "file":
        return unquote(urlparse(url).path)
    if scheme in ("http", "https"):
        raise UnreadableImageError("image_url: remote URLs are not fetched; pass a data: URL or a local path")
    return url
