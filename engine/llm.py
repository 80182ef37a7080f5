"""Offline batch generation: `LLM(model=...).generate(prompts, sampling_params)`."""
from __future__ import annotations

import itertools
from typing import Any

from tqdm import tqdm

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | dict


class LLM:
    def __init__(self, model: str | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory_gb: float | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True, seed: int = 0,
                 tensor_parallel_size: int = 1, **kwargs: Any):
        self.engine = LLMEngine(model, block_size=block_size, num_kv_blocks=num_kv_blocks,
                                kv_cache_memory_gb=kv_cache_memory_gb, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                enable_prefix_caching=enable_prefix_caching,
                                enable_chunked_prefill=enable_chunked_prefill, seed=seed,
                                tensor_parallel_size=tensor_parallel_size, **kwargs)
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

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. A bad prompt or parameter fails that request only (`error` set)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        request_ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, sp in zip(request_ids, prompts, params):
            self.engine.add_request(request_id, prompt, sp)
        return self._run(request_ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while len(finished) < len(wanted) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted and out.request_id not in finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[r] for r in request_ids]

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()


def _per_prompt(sampling_params, count: int) -> list:
    if sampling_params is None or not isinstance(sampling_params, (list, tuple)):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(f"sampling_params has {len(sampling_params)} entries for {count} prompts")
    return list(sampling_params)
