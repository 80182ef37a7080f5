"""The step loop: requests in, scheduler -> executor (model runner) -> sampler -> detokenizer, per-request deltas
out."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cogvlm2.errors import CogVLM2Error, ImagesDisabledError
from cogvlm2.model_source import resolve_model
from cogvlm2.parallel import check_tensor_parallel
from cogvlm2.precision import checkpoint_dtype, resolve_precision
from cogvlm2.processor import CogVLM2Processor, ProcessedPrompt
from cogvlm2.tokenizer import Llama3Tokenizer
from engine.batch import ImagePlanner, PromptLogitsRows, StepInputs
from engine.block_manager import BlockManager
from engine.config import EngineArgs, image_limit
from engine.detokenizer import IncrementalDetokenizer
from engine.distributed import WorkerFailure
from engine.executor import make_executor
from engine.model_runner import KVCacheSpec, RunnerConfig
from engine.outputs import (CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput,
                            merge_deltas)
from engine.sampler import Sampler, SamplingState, TokenLogprobs, position_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence
from engine.structured_outputs import GrammarCompiler
from engine.timing import PhaseTimer
from kernels.quantization import check_quantization
from kernels.sku import detect_sku_info

logger = logging.getLogger(__name__)

PROMPT_KEYS = {"prompt", "prompt_token_ids", "image", "multi_modal_data", "history", "template"}


@dataclass
class RequestState:
    """The engine's side of one completion of a request (one sequence). Its output token ids live once, in
    `seq.output_token_ids`."""
    seq: Sequence
    request_id: str  # the caller's id; seq.request_id is this completion's own (they differ for copies of n > 1)
    index: int  # which of the request's n completions
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    sampling: SamplingState
    stop_reason: str | int | None = None
    text_started: bool = False  # the answer's leading whitespace is dropped until its first visible character
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # filled as the prompt is computed
    prompt_logprobs_sent: bool = False
    counted_finished: bool = False


@dataclass
class RequestGroup:
    """The completions of one request: its sequence ids (one, or n copies) and how many are still running."""
    seq_ids: list[str]
    num_unfinished: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_unfinished = len(self.seq_ids)


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs: Any):
        self.args = EngineArgs(model=model, **kwargs)
        source = resolve_model(self.args.model, self.args.config_yaml)
        self.config = source.config
        self.tokenizer = (Llama3Tokenizer.from_file(self.args.tokenizer) if self.args.tokenizer
                          else Llama3Tokenizer.for_model_dir(source.model_dir))
        self.processor = CogVLM2Processor(self.config, self.tokenizer, max_image_pixels=self.args.max_image_pixels)
        check_tensor_parallel(self.config, self.args.tensor_parallel_size)
        # a quantized checkpoint serves with its method unless another int8 method is asked for (same weights)
        self.quantization = check_quantization(self.args.quantization or self.config.quantization)
        self.precision = resolve_precision(self.args.dtype, self.args.kv_cache_dtype, self.config,
                                           checkpoint_dtype(self.config), detect_sku_info().has_bf16_dot, self.args.device)
        self.max_model_len = self.args.max_model_len or self.config.max_position_embeddings
        if self.max_model_len > self.config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        # one device's KV layout: sizes the pool here and prices its blocks in stats()
        self.kv_spec = KVCacheSpec.for_model(self.config, self.args.tensor_parallel_size, self.args.block_size,
                                             precision=self.precision)
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, self.args.block_size, self.args.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=self.args.max_num_seqs, max_num_batched_tokens=self.args.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_chunked_prefill=self.args.enable_chunked_prefill),
            self.block_manager)
        self.timer = PhaseTimer()
        self.images = ImagePlanner(self.args.encoder_cache_size)
        self.executor = make_executor(RunnerConfig(
            source, self.args.block_size, num_blocks, self.args.kernels, self.args.tensor_parallel_size,
            mm_encoder_tp_mode=self.args.mm_encoder_tp_mode, precision=self.precision, device=self.args.device,
            quantization=self.quantization, with_vision=image_limit(self.args) > 0), self.timer)
        self.grammars = GrammarCompiler(self.tokenizer.encoding, self.config.vocab_size, self.config.eos_token_ids)
        self.sampler = Sampler(self.config.eos_token_ids, self.grammars, self.args.logprobs_mode)
        self.requests: dict[str, RequestState] = {}  # by sequence id
        self.groups: dict[str, RequestGroup] = {}  # by the caller's request id
        self._token_texts: dict[int, str] = {}  # Logprob.decoded_token by token id
        self._pending_outputs: list[RequestOutput] = []
        self._request_counter = itertools.count()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any. Idempotent."""
        self.executor.shutdown()

    def _num_kv_blocks(self) -> int:
        if self.args.num_kv_blocks is not None:
            return self.args.num_kv_blocks
        return self.kv_spec.blocks_for_budget(self.args.kv_cache_memory_gb, self.args.max_num_seqs, self.max_model_len)

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | dict | ProcessedPrompt, sampling_params: SamplingParams | dict | None = None,
                    arrival_time: float | None = None) -> None:
        """Bad input fails this request only: its output (finish_reason 'error') comes from the next step()."""
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        if request_id in self.groups or request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        try:
            states = self._admit(request_id, prompt, sampling_params, arrival)
        except Exception as e:  # noqa: BLE001  (whatever admitting raises fails this request, and only it)
            self._pending_outputs.append(RequestOutput.failed(request_id, _prompt_text(prompt), arrival,
                                                              _admission_error(request_id, e)))
            return
        self.groups[request_id] = RequestGroup([state.seq.request_id for state in states])
        for state in states:
            self.requests[state.seq.request_id] = state
            if not self.scheduler.add_request(state.seq):
                self._collect_rejected()

    def _admit(self, request_id: str, prompt: str | dict, sampling_params: SamplingParams | dict | None,
               arrival: float) -> list[RequestState]:
        """Everything that can fail for one request, before it touches the scheduler: its completions' states."""
        params = _as_sampling_params(sampling_params)
        processed, prompt_text = self._process(prompt)
        self._check_token_ids(params)
        self._check_reachable(params, len(processed.input_ids))
        self._check_logprobs(params)
        states = [self._completion_state(request_id, index, copy_params, processed, prompt_text, arrival)
                  for index, copy_params in enumerate(_completion_params(params))]
        source = states[0].seq
        for state in states[1:]:
            if state.seq.request_id in self.requests:
                raise ValueError(f"request_id {state.seq.request_id!r} (copy {state.index} of request "
                                 f"{request_id!r}) is already in use")
            state.seq.prompt_source = source
            source.prompt_copies.append(state.seq)
        return states

    def _completion_state(self, request_id: str, index: int, params: SamplingParams, processed: ProcessedPrompt,
                          prompt_text: str | None, arrival: float) -> RequestState:
        seq = Sequence(request_id=_completion_id(request_id, index), prompt_token_ids=processed.input_ids,
                       prompt_token_type_ids=processed.token_type_ids, prompt_position_ids=processed.position_ids,
                       prompt_vision_expert_mask=processed.vision_expert_mask, image_hash=processed.image_hash,
                       pixel_values=processed.pixel_values, sampling_params=params, arrival_time=arrival,
                       reads_prefix_cache=params.prompt_logprobs is None)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                             params.include_stop_str_in_output)
        sampling = SamplingState.create(params, processed.input_ids, self.args.seed, next(self._request_counter),
                                        output_token_ids=seq.output_token_ids)
        if params.structured_outputs is not None:
            sampling.matcher = self.grammars.matcher(params.structured_outputs)
        sampling.bad_word_ids = self._bad_word_ids(params)
        return RequestState(seq, request_id, index, prompt_text, detokenizer, sampling)

    def _bad_word_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word's token sequences, alone and after a space (vLLM's rule)."""
        sequences = []
        for word in params.bad_words or []:
            for text in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(text)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def _check_token_ids(self, params: SamplingParams) -> None:
        for name in ("allowed_token_ids", "logit_bias"):
            outside = [t for t in getattr(params, name) or [] if t >= self.config.vocab_size]
            if outside:
                raise ValueError(f"{name} has token ids outside the vocabulary (size {self.config.vocab_size}): "
                                 f"{outside[:5]}")

    def _check_logprobs(self, params: SamplingParams) -> None:
        limit = self.args.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and limit != -1 and (k == -1 or k > limit):
                raise ValueError(f"{name}={k} is more than this engine's max_logprobs={limit}")

    def _check_reachable(self, params: SamplingParams, prompt_len: int) -> None:
        room = self.max_model_len - prompt_len
        if 0 < params.min_tokens > room:
            raise ValueError(f"min_tokens {params.min_tokens} cannot be reached: the prompt has {prompt_len} tokens "
                             f"and max_model_len is {self.max_model_len}, so at most {max(room, 0)} can be generated")

    def _process(self, prompt: str | dict) -> tuple[ProcessedPrompt, str | None]:
        """A prompt: a str, or a dict with 'prompt' (plus image, history, template) or vLLM's 'prompt_token_ids';
        the image as 'image' or vLLM's multi_modal_data={'image': ...}."""
        if isinstance(prompt, str):
            return self.processor(prompt), prompt
        if isinstance(prompt, ProcessedPrompt):  # processed by the caller (the server, off the engine thread)
            if prompt.pixel_values is not None:
                self._check_image_allowed()
            return prompt, prompt.prompt_text
        if not isinstance(prompt, dict):
            raise TypeError(f"prompt must be a str or a dict with keys {sorted(PROMPT_KEYS)}, "
                            f"got {type(prompt).__name__}")
        unknown = set(prompt) - PROMPT_KEYS
        if unknown:
            raise ValueError(f"prompt dict has unknown keys {sorted(unknown)}; allowed: {sorted(PROMPT_KEYS)}")
        image = self._prompt_image(prompt)
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise ValueError("prompt dict needs exactly one of the keys 'prompt' and 'prompt_token_ids'")
        if "prompt_token_ids" in prompt:
            text_only = {"history", "template"} & {k for k, v in prompt.items() if v is not None}
            if text_only:
                raise ValueError(f"prompt dict keys {sorted(text_only)} need 'prompt' (text), not 'prompt_token_ids'")
            return self.processor.from_token_ids(prompt["prompt_token_ids"], image=image), None
        processed = self.processor(prompt["prompt"], image=image, history=prompt.get("history"),
                                   template=prompt.get("template"))
        return processed, prompt["prompt"]

    def _prompt_image(self, prompt: dict) -> Any:
        media = prompt.get("multi_modal_data")
        if media is not None:
            if not isinstance(media, dict) or set(media) - {"image"}:
                raise ValueError(f"multi_modal_data must be a dict with the key 'image' (CogVLM2 takes images "
                                 f"only), got {media!r:.80}")
            if prompt.get("image") is not None:
                raise ValueError("the prompt has both 'image' and multi_modal_data['image']: give one")
        image = prompt.get("image") if media is None else media.get("image")
        if image is not None:
            self._check_image_allowed()
        return image

    def _check_image_allowed(self) -> None:
        if image_limit(self.args) == 0:
            raise ImagesDisabledError("this engine serves text only (limit_mm_per_prompt={'image': 0}: no vision "
                                      "tower loaded); the request's 'image' cannot be used")

    def abort_request(self, request_id: str) -> None:
        """Aborts every unfinished completion of the request."""
        group = self.groups.get(request_id)
        for seq_id in group.seq_ids if group is not None else []:
            seq = self.scheduler.abort(seq_id)
            state = self.requests.pop(seq_id, None)
            if seq is not None and state is not None:
                self._pending_outputs.append(self._delta(state, [], state.detokenizer.flush(), None))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_outputs)

    def _collect_rejected(self) -> None:
        for seq in self.scheduler.take_rejected():
            state = self.requests.pop(seq.request_id)
            self._pending_outputs.append(self._delta(state, [], "", None))

    # ---- the step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step. Returns a delta for every request that progressed or finished."""
        with self.timer.phase("schedule"):
            scheduled = self.scheduler.schedule()
        self._collect_rejected()
        outputs, self._pending_outputs = self._pending_outputs, []
        if scheduled.is_empty:
            return merge_deltas(outputs)
        with self.timer.phase("prepare_inputs"):
            request = self.images.request(scheduled.chunks, self.args.block_size)
        try:
            logits = self.executor.run_step(request)
        except WorkerFailure as e:
            self._pending_outputs = outputs + self._fail_all_requests(str(e))
            raise
        with self.timer.phase("postprocess"):
            self.scheduler.update_after_step(scheduled)
            self._collect_prompt_logprobs(scheduled, request.inputs.prompt_rows, logits)
        return merge_deltas(outputs + self._apply_samples(scheduled, request.inputs, logits))

    def _fail_all_requests(self, message: str) -> list[RequestOutput]:
        """The model is gone (a tensor-parallel worker failed): every unfinished request ends with an error."""
        outputs = []
        for state in self.requests.values():
            self.scheduler.finish(state.seq, "error")
            state.seq.error = message
            outputs.append(self._delta(state, [], state.detokenizer.flush(), None))
        self.requests.clear()
        self.groups.clear()
        return outputs

    def _collect_prompt_logprobs(self, scheduled: SchedulerOutput, prompt_rows: list[PromptLogitsRows],
                                 logits: np.ndarray) -> None:
        """Prompt logprobs of this step's rows, from the model's logits (log_softmax over the whole vocabulary)."""
        for rows in prompt_rows:
            state = self.requests.get(scheduled.chunks[rows.chunk_index].seq.request_id)
            if state is None:  # aborted while the step ran
                continue
            seq = state.seq
            if state.prompt_logprobs is None:
                state.prompt_logprobs = [None] * seq.num_prompt_tokens
            block = logits[rows.row:rows.row + rows.count]
            block = block - _logsumexp_rows(block)
            for j in range(rows.count):
                token_index = rows.first_token + j
                token = seq.prompt_token_ids[token_index]
                entry = position_logprobs(block[j], token if 0 <= token < block.shape[1] else None,
                                          seq.sampling_params.prompt_logprobs, normalise=False)
                state.prompt_logprobs[token_index] = self._logprob_dict(entry)

    def _logprob_dict(self, entry: TokenLogprobs) -> PositionLogprobs:
        return {t: Logprob(lp, rank, self._token_text(t))
                for t, lp, rank in zip(entry.token_ids, entry.logprobs, entry.ranks)}

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")
        return text

    def _apply_samples(self, scheduled: SchedulerOutput, inputs: StepInputs, logits: np.ndarray) -> list[RequestOutput]:
        sampled_chunks = [c for c in scheduled.chunks if c.needs_sample]
        if not sampled_chunks:
            return []
        states = [self.requests[c.seq.request_id] for c in sampled_chunks]
        if inputs.prompt_rows:  # else the logits are the sampled rows already
            logits = logits[inputs.sample_rows]
        with self.timer.phase("sample"):
            result = self.sampler(logits, [s.sampling for s in states])
        with self.timer.phase("postprocess"):
            return self._finish_samples(states, result)

    def _finish_samples(self, states: list[RequestState], result) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for i, state in enumerate(states):
            token_ids, text = self._append_token(state, int(result.token_ids[i]), now)
            logprobs = None
            if state.seq.sampling_params.logprobs is not None:
                logprobs = [self._logprob_dict(result.logprobs[i])] if token_ids else []
                state.cumulative_logprob += result.logprobs[i].logprobs[0] if token_ids else 0.0
            outputs.append(self._delta(state, token_ids, text, logprobs))
            if state.seq.is_finished:
                self.requests.pop(state.seq.request_id, None)
        return outputs

    def _append_token(self, state: RequestState, token: int, now: float) -> tuple[list[int], str]:
        """Appends a sampled token and applies the stop conditions: (the token ids kept, the text they add)."""
        seq, params = state.seq, state.seq.sampling_params
        if seq.first_token_time is None:
            seq.first_token_time = now
        if self._is_stop_token(token, params, seq.num_output_tokens):
            state.stop_reason = token if token in (params.stop_token_ids or []) else None
            self.scheduler.finish(seq, "stop")
            return [], state.detokenizer.flush()
        seq.output_token_ids.append(token)
        seq.last_token_time = now
        update = state.detokenizer.add_token(token)
        text = update.new_text
        if update.stopped:
            state.stop_reason = update.stop_reason
            self.scheduler.finish(seq, "stop")
        elif self._grammar_complete(state, token):
            text += state.detokenizer.flush()
            self.scheduler.finish(seq, "stop")
        elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or \
                self.scheduler.reached_max_len(seq):
            text += state.detokenizer.flush()
            self.scheduler.finish(seq, "length")
        return [token], text

    @staticmethod
    def _grammar_complete(state: RequestState, token: int) -> bool:
        """Feeds a constrained request's token to its matcher: True once its grammar allows nothing more."""
        matcher = state.sampling.matcher
        if matcher is None:
            return False
        matcher.consume_token(token)
        return matcher.is_stopped() or matcher.is_error()

    def _is_stop_token(self, token: int, params: SamplingParams, num_generated: int) -> bool:
        if num_generated < params.min_tokens:
            return False
        return token in (params.stop_token_ids or []) or (
            not params.ignore_eos and token in self.config.eos_token_ids)

    def _delta(self, state: RequestState, token_ids: list[int], text: str,
               logprobs: list[PositionLogprobs] | None) -> RequestOutput:
        seq = state.seq
        if not state.text_started:
            # The answer follows "Answer:": like the reference, the text drops the leading space.
            text = text.lstrip()
            state.text_started = bool(text)
        cumulative = state.cumulative_logprob if seq.sampling_params.logprobs is not None else None
        completion = CompletionOutput(state.index, text, token_ids, seq.finish_reason, logprobs, state.stop_reason,
                                      cumulative)
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time,
                                 seq.finished_time, seq.last_token_time)
        return RequestOutput(state.request_id, state.prompt, seq.prompt_token_ids, [completion],
                             self._request_finished(state), metrics, seq.error, seq.num_cached_prompt_tokens,
                             self._take_prompt_logprobs(state))

    def _request_finished(self, state: RequestState) -> bool:
        """True once every completion of the state's request has finished (counting this one, once)."""
        if not state.seq.is_finished:
            return False
        group = self.groups.get(state.request_id)
        if group is None:
            return True
        if not state.counted_finished:
            state.counted_finished = True
            group.num_unfinished -= 1
        if group.num_unfinished == 0:
            self.groups.pop(state.request_id, None)
        return group.num_unfinished == 0

    @staticmethod
    def _take_prompt_logprobs(state: RequestState) -> list[PositionLogprobs | None] | None:
        """The prompt logprobs, once: in the first delta after the whole prompt was computed."""
        if state.prompt_logprobs is None or state.prompt_logprobs_sent:
            return None
        if state.seq.num_computed_tokens < state.seq.num_prompt_tokens and not state.seq.is_finished:
            return None
        state.prompt_logprobs_sent = True
        return state.prompt_logprobs

    # ---- introspection -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        bm, sch = self.block_manager, self.scheduler
        block_bytes = self.kv_spec.bytes_per_block
        return {
            "dtype": self.precision.compute, "kv_cache_dtype": self.precision.kv_cache,
            "quantization": self.quantization, "limit_mm_per_prompt": self.args.limit_mm_per_prompt,
            "kv_cache_bytes": bm.num_total_blocks * block_bytes,
            "kv_cache_used_bytes": (bm.num_total_blocks - bm.num_free_blocks) * block_bytes,
            "num_total_blocks": bm.num_total_blocks, "num_free_blocks": bm.num_free_blocks,
            "num_preemptions": sch.num_preemptions, "prefix_cache_hit_tokens": bm.prefix_cache_hit_tokens,
            "prefix_cache_queried_tokens": bm.prefix_cache_queried_tokens,
            "shared_prompt_tokens": bm.shared_prompt_tokens,
            "computed_prompt_tokens": sch.num_computed_prompt_tokens,
            "num_prefill_chunks": sch.num_prefill_chunks, "num_steps": sch.num_steps,
            "num_running": sch.num_running, "num_waiting": sch.num_waiting,
            "num_images_encoded": self.executor.num_images_encoded, "block_size": self.args.block_size,
            "encoder_cache_queries": self.images.num_queries, "encoder_cache_hits": self.images.num_hits,
            "enable_prefix_caching": self.args.enable_prefix_caching,
            "max_model_len": self.max_model_len, "kernels": self.executor.info.kernels,
        }


def _completion_params(params: SamplingParams) -> list[SamplingParams]:
    """One SamplingParams per completion: copy i of a seeded request draws with seed + i (so each copy is the
    same as a request of its own with that seed); only the first computes prompt logprobs."""
    if params.n == 1:
        return [params]
    return [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i,
                                prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            for i in range(params.n)]


def _completion_id(request_id: str, index: int) -> str:
    """The sequence id of completion `index` (the first keeps the request's id)."""
    return request_id if index == 0 else f"{request_id}#{index}"


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def _as_sampling_params(params: SamplingParams | dict | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    raise TypeError(f"sampling_params must be a SamplingParams or a dict, got {type(params).__name__}")


# Errors that describe the request itself: their message goes back to its caller.
INPUT_ERRORS = (CogVLM2Error, ValueError, TypeError, FileNotFoundError)
INTERNAL_ERROR = "InternalError"  # the error text's prefix for anything else (not the request's fault)


def _admission_error(request_id: str, error: Exception) -> str:
    """The failed request's error text: an input error's own message; anything else is logged with its traceback
    and the caller gets a generic message with the request id (the exception text may describe the server)."""
    if isinstance(error, INPUT_ERRORS):
        return f"{type(error).__name__}: {error}"
    logger.error("request %s failed while being admitted", request_id, exc_info=error)
    return f"{INTERNAL_ERROR}: the request could not be admitted (request id {request_id}; see the server log)"


def _prompt_text(prompt: Any) -> str | None:
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    return text if isinstance(text, str) else None
