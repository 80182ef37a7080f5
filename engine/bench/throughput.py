"""`cogvlm2 bench throughput`: every request handed to the in-process engine (LLM) at once, as vLLM's
`vllm bench throughput`: requests/s, total tokens/s and output tokens/s over the whole run."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.bench.datasets import DEFAULT_NUM_PROMPTS, SampleRequest, add_dataset_args, sample_requests
from engine.bench.results import write_json
from engine.config import add_cli_args, engine_kwargs
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.outputs import RequestOutput


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    add_cli_args(parser)  # the engine's flags; --seed also seeds the dataset, as in vLLM
    add_dataset_args(parser)
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS, help="requests in the run")
    parser.add_argument("--output-json", default=None, metavar="FILE", help="write the results as JSON (- prints)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def engine_inputs(requests: list[SampleRequest]) -> tuple[list[dict], list[SamplingParams]]:
    """The engine's prompts and sampling parameters: greedy (runs repeat), exactly expected_output_len tokens."""
    prompts = [{"prompt": r.prompt} if r.image is None else {"prompt": r.prompt, "image": r.image} for r in requests]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=r.expected_output_len) for r in requests]
    return prompts, params


def timed_generate(llm: LLM, prompts: list[dict], params: list[SamplingParams],
                   use_tqdm: bool = True) -> tuple[list[RequestOutput], float]:
    """All requests at once through the engine: the outputs, and the wall-clock seconds they took."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    return outputs, time.perf_counter() - start


@dataclass
class ThroughputResult:
    elapsed_time: float
    num_requests: int
    total_prompt_tokens: int
    total_output_tokens: int

    @classmethod
    def from_outputs(cls, outputs: list[RequestOutput], elapsed_time: float) -> "ThroughputResult":
        failed = [o for o in outputs if o.error]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0].error}")
        return cls(elapsed_time, len(outputs), sum(len(o.prompt_token_ids) for o in outputs),
                   sum(len(o.outputs[0].token_ids) for o in outputs))

    @property
    def total_num_tokens(self) -> int:
        return self.total_prompt_tokens + self.total_output_tokens

    def to_json(self) -> dict[str, Any]:
        """vLLM's keys, and the output tokens/s beside them."""
        return {"elapsed_time": self.elapsed_time, "num_requests": self.num_requests,
                "total_num_tokens": self.total_num_tokens, "total_prompt_tokens": self.total_prompt_tokens,
                "total_output_tokens": self.total_output_tokens,
                "requests_per_second": self.num_requests / self.elapsed_time,
                "tokens_per_second": self.total_num_tokens / self.elapsed_time,
                "output_tokens_per_second": self.total_output_tokens / self.elapsed_time}

    def report(self) -> str:
        return (f"Throughput: {self.num_requests / self.elapsed_time:.2f} requests/s, "
                f"{self.total_num_tokens / self.elapsed_time:.2f} total tokens/s, "
                f"{self.total_output_tokens / self.elapsed_time:.2f} output tokens/s\n"
                f"Total num prompt tokens:  {self.total_prompt_tokens}\n"
                f"Total num output tokens:  {self.total_output_tokens}")


def main(args: argparse.Namespace) -> int:
    from engine.llm import LLM  # lazy: building the parser must not load MindSpore
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    prompts, params = engine_inputs(sample_requests(args, args.num_prompts))
    with LLM(args.model, **engine_kwargs(args)) as llm:
        outputs, elapsed = timed_generate(llm, prompts, params, use_tqdm=not args.disable_tqdm)
    result = ThroughputResult.from_outputs(outputs, elapsed)
    print(result.report())
    if args.output_json:
        write_json(args.output_json, result.to_json())
    return 0
