"""The step loop: requests in, scheduler -> model runner -> sampler -> detokenizer, RequestOutputs out."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cogvlm2.errors import CogVLM2Error
from cogvlm2.model import CogVLM2Model
from cogvlm2.model_source import ModelSource, resolve_model
from cogvlm2.parallel import check_tensor_parallel, kv_heads_per_rank
from cogvlm2.processor import CogVLM2Processor, ProcessedPrompt
from cogvlm2.tokenizer import Llama3Tokenizer
from engine.block_manager import BlockManager
from engine.detokenizer import IncrementalDetokenizer
from engine.distributed import TensorParallelExecutor, WorkerFailure
from engine.model_runner import KVCacheSpec, ModelRunner
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampler import Sampler, SamplingState
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.timing import PhaseTimer
from kernels.registry import get_kernels
from engine.sequence import Sequence

PROMPT_KEYS = {"prompt", "image", "history", "template"}
DEFAULT_KV_CACHE_GB = 1.0


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    config_yaml: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    max_image_pixels: int = 40_000_000
    enforce_eager: bool = False  # True: no compiled decoder graphs (PyNative only)
    kernels: str = "auto"  # "auto" (CPU kernels, else the references with a warning), "cpu" or "reference"
    graph_max_tokens: int | None = None  # largest compiled token bucket; default max_num_batched_tokens
    tensor_parallel_size: int = 1  # > 1: the model runs sharded on that many msrun workers (engine/distributed.py)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass
class RequestState:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer | None
    sampling: SamplingState | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs: Any):
        self.args = EngineArgs(model=model, **kwargs)
        source = resolve_model(self.args.model, self.args.config_yaml)
        self.config = source.config
        self.tokenizer = (Llama3Tokenizer.from_file(self.args.tokenizer) if self.args.tokenizer
                          else Llama3Tokenizer.for_model_dir(source.model_dir))
        self.processor = CogVLM2Processor(self.config, self.tokenizer, max_image_pixels=self.args.max_image_pixels)
        check_tensor_parallel(self.config, self.args.tensor_parallel_size)
        # under tensor parallelism the model lives in the workers only
        self.model = (CogVLM2Model.from_source(source, get_kernels(self.args.kernels))
                      if self.args.tensor_parallel_size == 1 else None)
        self.max_model_len = self.args.max_model_len or self.config.max_position_embeddings
        if self.max_model_len > self.config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, self.args.block_size, self.args.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=self.args.max_num_seqs, max_num_batched_tokens=self.args.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=self.args.enable_chunked_prefill),
            self.block_manager)
        self.timer = PhaseTimer()
        self.runner = self._start_runner(source, num_blocks)
        self.sampler = Sampler(self.config.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._request_counter = itertools.count()

    def _start_runner(self, source: ModelSource, num_blocks: int) -> ModelRunner | TensorParallelExecutor:
        if self.args.tensor_parallel_size > 1:  # workers run eager (cogvlm2/parallel.py)
            return TensorParallelExecutor(source, self.args.tensor_parallel_size, self.args.block_size, num_blocks,
                                          self.timer, kernels=self.args.kernels)
        if not self.args.enforce_eager:  # RoPE is fused into the paged-attention kernel, not in the graphs
            self.model.language.enable_graphs(self.args.graph_max_tokens or self.args.max_num_batched_tokens,
                                              rope_in_graph=False)
        return ModelRunner(self.model, self.args.block_size, num_blocks, self.timer)

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any. Idempotent."""
        self.runner.shutdown()

    def _num_kv_blocks(self) -> int:
        if self.args.num_kv_blocks is not None:
            return self.args.num_kv_blocks
        c = self.config  # the budget is per device: each tensor-parallel rank caches only its KV heads
        spec = KVCacheSpec(c.num_hidden_layers, kv_heads_per_rank(c, self.args.tensor_parallel_size), c.head_dim,
                           self.args.block_size, 1)
        budget_gb = self.args.kv_cache_memory_gb or DEFAULT_KV_CACHE_GB
        by_budget = int(budget_gb * 2 ** 30) // spec.bytes_per_block
        # Never more than every running sequence at full length needs.
        enough = self.args.max_num_seqs * -(-self.max_model_len // self.args.block_size)
        num = min(by_budget, enough)
        if num < 1:
            raise ValueError(f"kv_cache_memory_gb {budget_gb} is too small for one KV block "
                             f"({spec.bytes_per_block} bytes)")
        return num

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | dict, sampling_params: SamplingParams | dict | None = None,
                    arrival_time: float | None = None) -> None:
        """Bad input fails this request only: its output (finish_reason 'error') comes from the next step()."""
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        try:
            params = _as_sampling_params(sampling_params)
            processed, prompt_text = self._process(prompt)
        except (CogVLM2Error, ValueError, TypeError, FileNotFoundError) as e:
            self._fail_now(request_id, prompt, arrival, f"{type(e).__name__}: {e}")
            return
        seq = Sequence(request_id=request_id, prompt_token_ids=processed.input_ids,
                       prompt_token_type_ids=processed.token_type_ids, prompt_position_ids=processed.position_ids,
                       prompt_vision_expert_mask=processed.vision_expert_mask, image_hash=processed.image_hash,
                       pixel_values=processed.pixel_values, sampling_params=params, arrival_time=arrival)
        state = RequestState(seq, prompt_text,
                             IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                                    params.include_stop_str_in_output),
                             SamplingState.create(params, processed.input_ids, self.args.seed,
                                                  next(self._request_counter)),
                             logprobs=[] if params.logprobs is not None else None)
        state.sampling.output_token_ids = state.token_ids
        self.requests[request_id] = state
        if not self.scheduler.add_request(seq):
            self._collect_rejected()

    def _process(self, prompt: str | dict) -> tuple[ProcessedPrompt, str]:
        if isinstance(prompt, str):
            return self.processor(prompt), prompt
        if not isinstance(prompt, dict):
            raise TypeError(f"prompt must be a str or a dict with keys {sorted(PROMPT_KEYS)}, "
                            f"got {type(prompt).__name__}")
        unknown = set(prompt) - PROMPT_KEYS
        if unknown:
            raise ValueError(f"prompt dict has unknown keys {sorted(unknown)}; allowed: {sorted(PROMPT_KEYS)}")
        if "prompt" not in prompt:
            raise ValueError("prompt dict needs the key 'prompt'")
        processed = self.processor(prompt["prompt"], image=prompt.get("image"), history=prompt.get("history"),
                                   template=prompt.get("template"))
        return processed, prompt["prompt"]

    def _fail_now(self, request_id: str, prompt: Any, arrival: float, message: str) -> None:
        text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
        now = time.monotonic()
        self._pending_outputs.append(RequestOutput(
            request_id, text if isinstance(text, str) else None, [],
            [CompletionOutput(0, "", [], "error")], True, RequestMetrics(arrival, finished_time=now), error=message))

    def abort_request(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        state = self.requests.pop(request_id, None)
        if seq is not None and state is not None:
            state.detokenizer.flush()
            self._pending_outputs.append(self._output(state))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_outputs)

    def _collect_rejected(self) -> None:
        for seq in self.scheduler.take_rejected():
            state = self.requests.pop(seq.request_id)
            self._pending_outputs.append(self._output(state))

    # ---- the step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step. Returns the outputs of every request that progressed or finished."""
        with self.timer.phase("schedule"):
            scheduled = self.scheduler.schedule()
        self._collect_rejected()
        outputs, self._pending_outputs = self._pending_outputs, []
        if scheduled.is_empty:
            return outputs
        try:
            logits = self.runner.execute(scheduled)
        except WorkerFailure as e:
            self._pending_outputs = outputs + self._fail_all_requests(str(e))
            raise
        with self.timer.phase("postprocess"):
            self.scheduler.update_after_step(scheduled)
        return outputs + self._apply_samples(scheduled, logits)

    def _fail_all_requests(self, message: str) -> list[RequestOutput]:
        """The model is gone (a tensor-parallel worker failed): every unfinished request ends with an error."""
        outputs = []
        for state in self.requests.values():
            self.scheduler.finish(state.seq, "error")
            state.seq.error = message
            state.detokenizer.flush()
            outputs.append(self._output(state))
        self.requests.clear()
        return outputs

    def _apply_samples(self, scheduled: SchedulerOutput, logits: np.ndarray) -> list[RequestOutput]:
        sampled_chunks = [c for c in scheduled.chunks if c.needs_sample]
        if not sampled_chunks:
            return []
        states = [self.requests[c.seq.request_id] for c in sampled_chunks]
        with self.timer.phase("sample"):
            result = self.sampler(logits, [s.sampling for s in states])
        with self.timer.phase("postprocess"):
            return self._finish_samples(states, result)

    def _finish_samples(self, states: list[RequestState], result) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for i, state in enumerate(states):
            token = int(result.token_ids[i])
            logprobs = result.logprobs[i] if result.logprobs is not None else None
            self._append_token(state, token, logprobs, now)
            outputs.append(self._output(state))
            if state.seq.is_finished:
                self.requests.pop(state.seq.request_id, None)
        return outputs

    def _append_token(self, state: RequestState, token: int, logprobs: dict | None, now: float) -> None:
        seq, params = state.seq, state.seq.sampling_params
        if seq.first_token_time is None:
            seq.first_token_time = now
        if self._is_stop_token(token, params, len(state.token_ids)):
            state.stop_reason = token if token in (params.stop_token_ids or []) else None
            state.detokenizer.flush()
            self.scheduler.finish(seq, "stop")
            return
        seq.output_token_ids.append(token)
        state.token_ids.append(token)
        if state.logprobs is not None and logprobs is not None:
            state.logprobs.append(logprobs)
        update = state.detokenizer.add_token(token)
        if update.stopped:
            state.stop_reason = update.stop_reason
            self.scheduler.finish(seq, "stop")
        elif (params.max_tokens is not None and len(state.token_ids) >= params.max_tokens) or \
                self.scheduler.reached_max_len(seq):
            state.detokenizer.flush()
            self.scheduler.finish(seq, "length")

    def _is_stop_token(self, token: int, params: SamplingParams, num_generated: int) -> bool:
        if num_generated < params.min_tokens:
            return False
        return token in (params.stop_token_ids or []) or (
            not params.ignore_eos and token in self.config.eos_token_ids)

    def _output(self, state: RequestState) -> RequestOutput:
        seq = state.seq
        # The answer follows "Answer:": like the reference, the text drops the leading space (prefix-stable,
        # so streamed deltas stay consistent).
        completion = CompletionOutput(0, state.detokenizer.text.lstrip(), list(state.token_ids), seq.finish_reason,
                                      list(state.logprobs) if state.logprobs is not None else None,
                                      state.stop_reason)
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time,
                                 seq.finished_time)
        return RequestOutput(seq.request_id, state.prompt, list(seq.prompt_token_ids), [completion],
                             seq.is_finished, metrics, seq.error, seq.num_cached_prompt_tokens)

    # ---- introspection -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        bm, sch = self.block_manager, self.scheduler
        return {
            "num_total_blocks": bm.num_total_blocks, "num_free_blocks": bm.num_free_blocks,
            "num_preemptions": sch.num_preemptions, "prefix_cache_hit_tokens": bm.prefix_cache_hit_tokens,
            "prefix_cache_queried_tokens": bm.prefix_cache_queried_tokens,
            "num_prefill_chunks": sch.num_prefill_chunks, "num_steps": sch.num_steps,
            "num_running": sch.num_running, "num_waiting": sch.num_waiting,
            "num_images_encoded": self.runner.num_images_encoded, "block_size": self.args.block_size,
            "max_model_len": self.max_model_len,
        }


def _as_sampling_params(params: SamplingParams | dict | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    raise TypeError(f"sampling_params must be a SamplingParams or a dict, got {type(params).__name__}")
