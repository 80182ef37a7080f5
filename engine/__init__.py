"""The serving core: paged KV cache, continuous batching scheduler, sampling, the LLM API."""
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "LLMEngine", "AsyncLLM", "EngineArgs", "AsyncEngineArgs", "SamplingParams", "RequestOutputKind",
           "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # Lazy: importing `engine` must not load MindSpore until a model is actually built.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from engine.async_llm import AsyncLLM
        return AsyncLLM
    if name in ("EngineArgs", "AsyncEngineArgs"):  # vLLM has two classes; here one list of settings serves both
        from engine.config import EngineArgs
        return EngineArgs
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
