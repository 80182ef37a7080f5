"""EngineArgs: the one list of engine settings. `LLM(model, **kwargs)`, `LLMEngine(model, **kwargs)` and the CLI's
engine flags (`add_cli_args`) are all derived from its fields, with the help text kept beside each default."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cogvlm2.image import DEFAULT_MAX_PIXELS
from cogvlm2.precision import DTYPES, KV_CACHE_DTYPES
from engine.sampler import LOGPROBS_MODES
from kernels.device import DEVICES
from kernels.quantization import QUANTIZATIONS
from kernels.sku import BACKENDS as KERNEL_BACKENDS

MM_ENCODER_TP_MODES = ("weights", "data")


def _arg(default: Any, help: str, flag: str | None = None, cli: bool = True, aliases: tuple[str, ...] = (),
         **kwargs: Any) -> Any:
    """A field whose metadata carries its CLI help (and flag name, when not derived from the field's name; aliases:
    older spellings still accepted)."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli, "aliases": aliases, **kwargs})


MAX_IMAGES_PER_PROMPT = 1  # CogVLM2 takes one image per conversation


def image_limit(args: EngineArgs) -> int:
    """Images a prompt may carry: 1 (CogVLM2's most), or 0 when limit_mm_per_prompt says so."""
    return (args.limit_mm_per_prompt or {}).get("image", MAX_IMAGES_PER_PROMPT)


def parse_mm_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt: "image=0" (key=value pairs, comma-separated) or a JSON object."""
    import json
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    limits = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--limit-mm-per-prompt: expected modality=count, got {item!r}")
        limits[key.strip()] = int(value)
    return limits


@dataclass
class EngineArgs:
    model: str | None = _arg(None, "checkpoint folder, .ckpt file or preset (default: demo)")
    tokenizer: str | None = _arg(None, "tokenizer.model or tokenizer.json (default: the model's, else Llama-3's "
                                       "from llama-models)")
    config_yaml: str | None = _arg(None, "MindFormers model yaml (model sizes), e.g. to serve a .ckpt without a "
                                         "config.json beside it (generate also takes it as --config)",
                                   flag="--model-config")
    block_size: int = _arg(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = _arg(None, "KV-cache blocks (default: from --kv-cache-memory-gb)")
    kv_cache_memory_gb: float | None = _arg(None, "KV-cache budget per device in GiB (default 1)")
    max_num_seqs: int = _arg(64, "most sequences in one step")
    max_num_batched_tokens: int = _arg(2048, "most tokens in one step")
    max_model_len: int | None = _arg(None, "context length (default: the model's max_position_embeddings)")
    enable_prefix_caching: bool = _arg(True, "reuse the KV blocks of identical prompt prefixes")
    enable_chunked_prefill: bool = _arg(True, "split long prefills over several steps")
    seed: int = _arg(0, "engine seed: requests that set no seed draw from it (vLLM's --seed)",
                     aliases=("--engine-seed",))
    max_logprobs: int = _arg(20, "most logprobs / prompt_logprobs per position a request may ask for (-1: the "
                                 "whole vocabulary)")
    logprobs_mode: str = _arg("raw_logprobs", "what logprobs report: the model's (raw_) or the sampled "
                                              "distribution's (processed_) logprobs or logits (engine/sampler.py)",
                              choices=LOGPROBS_MODES)
    dtype: str = _arg("auto", "weights and GEMM math: float32, bfloat16, float16, or auto (a yaml's compute_dtype, "
                              "else bfloat16 for a bf16 checkpoint on a CPU with bf16 dot products, else float32)",
                      choices=DTYPES)
    kv_cache_dtype: str = _arg("auto", "KV-cache storage (auto: the compute dtype)", choices=KV_CACHE_DTYPES)
    quantization: str | None = _arg(None, "weight quantization: w8a16 (int8 weights, one scale per output channel, "
                                          "dequantized inside the GEMMs) or w8a8 (the same weights and per-token "
                                          "int8 activations, integer dot products)",
                                    choices=[q for q in QUANTIZATIONS if q])
    max_image_pixels: int = _arg(DEFAULT_MAX_PIXELS, "largest image accepted, in pixels")
    limit_mm_per_prompt: dict | None = _arg(None, "most items per prompt by modality, e.g. image=0: text only, the "
                                                  "vision tower not loaded (CogVLM2 takes one image; vLLM's flag)",
                                            parse=parse_mm_limits)
    encoder_cache_size: int = _arg(64, "images whose vision features are kept")
    enforce_eager: bool = _arg(False, "accepted for vLLM compatibility: the engine always runs eagerly (its kernels "
                                      "dispatch in ~3 us; MindSpore graphs measured slower here)")
    kernels: str = _arg("auto", "hot-op implementations: CPU kernels (auto falls back to the references if not "
                                "built), the reference composites, or on Ascend MindSpore's built-in kernels or the "
                                "project's Ascend C ops (auto: per op, as the SKU's kernel table says)",
                        choices=KERNEL_BACKENDS)
    device: str = _arg("auto", "where the model runs: auto (an Ascend NPU when MindSpore reports one, else the CPU), "
                               "cpu, or ascend (an error naming what is missing when there is no NPU); under "
                               "tensor parallelism each worker takes the device of its local rank",
                       choices=DEVICES)
    tensor_parallel_size: int = _arg(1, "shard the model over N devices, one msrun worker each "
                                        "(docs/tensor_parallel.md)")
    mm_encoder_tp_mode: str = _arg("weights", "vision encoder under tensor parallelism: 'weights' shards it by "
                                              "heads, 'data' replicates it and splits the images",
                                   choices=MM_ENCODER_TP_MODES)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
                     "max_image_pixels", "encoder_cache_size"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1,
                     f"{name} must be a positive int, got {getattr(self, name)!r}")
        _require(self.num_kv_blocks is None or (_is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1),
                 f"num_kv_blocks must be a positive int, got {self.num_kv_blocks!r}")
        _require(self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0,
                 f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        _require(self.max_model_len is None or (_is_int(self.max_model_len) and self.max_model_len >= 2),
                 f"max_model_len must be >= 2, got {self.max_model_len}")
        _require(self.kernels in KERNEL_BACKENDS, f"kernels must be one of {KERNEL_BACKENDS}, got {self.kernels!r}")
        _require(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(_is_int(self.max_logprobs) and self.max_logprobs >= -1,
                 f"max_logprobs must be an int >= -1, got {self.max_logprobs!r}")
        _require(self.logprobs_mode in LOGPROBS_MODES,
                 f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.limit_mm_per_prompt is not None:
            _check_mm_limits(self.limit_mm_per_prompt)
        _require(self.quantization in QUANTIZATIONS,
                 f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        _require(self.mm_encoder_tp_mode in MM_ENCODER_TP_MODES,
                 f"mm_encoder_tp_mode must be one of {MM_ENCODER_TP_MODES}, got {self.mm_encoder_tp_mode!r}")


def _check_mm_limits(limits: Any) -> None:
    _require(isinstance(limits, dict) and set(limits) <= {"image"},
             f"limit_mm_per_prompt must be a dict over the modality 'image', got {limits!r}")
    count = limits.get("image", MAX_IMAGES_PER_PROMPT)
    _require(_is_int(count) and 0 <= count <= MAX_IMAGES_PER_PROMPT,
             f"limit_mm_per_prompt['image'] must be 0 or {MAX_IMAGES_PER_PROMPT} (CogVLM2 takes one image per "
             f"prompt), got {count!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineArgs) if f.metadata.get("cli", True)]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field: --block-size, --enable-prefix-caching / --no-enable-prefix-caching, ..."""
    for f in _cli_fields():
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = f.metadata.get("parse") or _value_type(f)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag_of(f), *f.metadata.get("aliases", ()), **kwargs)


def _value_type(f: dataclasses.Field) -> type:
    text = f.type if isinstance(f.type, str) else f.type.__name__
    return float if "float" in text else int if "int" in text else str


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineArgs fields parsed by add_cli_args (all but `model`, which callers pass positionally)."""
    return {f.name: getattr(args, f.name) for f in _cli_fields() if f.name != "model"}
