"""The simple generation path: one conversation, a contiguous KV cache, greedy or sampled decoding.

Kept deliberately plain: it is the oracle the batched engine is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from mindspore import Tensor, ops

from cogvlm2.language_model import RopeInputs
from cogvlm2.layers import apply_rope, softmax_attention, split_qkv
from cogvlm2.model import CogVLM2Model, TokenBatch

if TYPE_CHECKING:
    from cogvlm2.processor import ProcessedPrompt


class ContiguousAttention:
    """Per-layer K/V of one sequence, kept in sequence order; causal by sequence index; RoPE by the reference
    composite."""

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.cached_index = np.zeros(0, np.int64)
        self.mask: Tensor | None = None
        self._cos_sin: tuple[Tensor, Tensor] | None = None

    def begin_step(self, batch: TokenBatch, token_position: np.ndarray) -> None:
        """`token_position`: each token's index in the sequence, in batch order."""
        query_index = token_position[batch.order]
        self.cached_index = np.concatenate([self.cached_index, query_index])
        visible = self.cached_index[None, :] <= query_index[:, None]
        group = self.num_heads // self.num_kv_heads
        mask = np.where(visible, np.float32(0), np.float32(-np.inf)).astype(np.float32)
        self.mask = Tensor.from_numpy(np.ascontiguousarray(np.tile(mask, (group, 1))[None]))
        self._cos_sin = None

    def __call__(self, layer: int, qkv: Tensor, rope: RopeInputs) -> Tensor:
        if self._cos_sin is None:  # the same positions for every layer of the step
            self._cos_sin = ops.gather(rope.cos_table, rope.positions, 0), ops.gather(rope.sin_table, rope.positions, 0)
        q, k, v = split_qkv(qkv, self.num_kv_heads)
        q, k = apply_rope(q, *self._cos_sin), apply_rope(k, *self._cos_sin)
        keys = k if self.keys[layer] is None else ops.concat((self.keys[layer], k), 0)
        values = v if self.values[layer] is None else ops.concat((self.values[layer], v), 0)
        self.keys[layer], self.values[layer] = keys, values
        n, kv, hd = q.shape[0], self.num_kv_heads, self.head_dim
        group = self.num_heads // kv
        # Query head h reads KV head h // group: rows of KV group j are (g, token) pairs.
        q_grouped = q.transpose(1, 0, 2).reshape(kv, group * n, hd)
        out = softmax_attention(q_grouped, keys.transpose(1, 0, 2), values.transpose(1, 0, 2), self.mask,
                                hd ** -0.5)
        return out.reshape(self.num_heads, n, hd).transpose(1, 0, 2).reshape(n, self.num_heads * hd)


@dataclass
class SimpleGenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


class SimpleGenerator:
    """Prefill the whole prompt, then one token per forward."""

    def __init__(self, model: CogVLM2Model):
        self.model = model
        c = model.config
        self.new_attention = lambda: ContiguousAttention(c.num_hidden_layers, c.num_attention_heads,  # noqa: E731
                                                         c.num_kv_heads, c.head_dim)

    def prefill_logits(self, prompt: ProcessedPrompt, all_positions: bool = False) -> np.ndarray:
        """Logits of the prompt's last position ([vocab]), or of every position ([L, vocab])."""
        attention = self.new_attention()
        logits = self._prefill(prompt, attention, all_positions)
        return logits if all_positions else logits[-1]

    def _prefill(self, prompt: ProcessedPrompt, attention: ContiguousAttention, all_positions: bool) -> np.ndarray:
        n = len(prompt.input_ids)
        types = np.asarray(prompt.token_type_ids)
        features, image_positions = None, None
        if prompt.pixel_values is not None:
            features = self.model.encode_images(prompt.pixel_values[None])[0]
            image_positions = np.nonzero(types == 1)[0]
        batch = TokenBatch(
            token_ids=np.asarray(prompt.input_ids), position_ids=np.asarray(prompt.position_ids),
            vision_expert=np.asarray(prompt.vision_expert_mask, bool),
            logits_positions=np.arange(n) if all_positions else np.array([n - 1]),
            image_features=features, image_positions=image_positions)
        attention.begin_step(batch, np.arange(n))
        return self.model.forward(batch, attention).asnumpy()

    def generate(self, prompt: ProcessedPrompt, max_tokens: int, stop_token_ids: tuple[int, ...] = (),
                 temperature: float = 0.0, seed: int | None = None,
                 step_logits: list[np.ndarray] | None = None) -> SimpleGenerationResult:
        """Greedy when temperature is 0, else sampling from softmax(logits / temperature) with `seed`."""
        rng = np.random.default_rng(seed)
        attention = self.new_attention()
        result = SimpleGenerationResult(list(prompt.input_ids))
        logits = self._prefill(prompt, attention, all_positions=False)[-1]
        position, index = int(prompt.position_ids[-1]), len(prompt.input_ids)
        for _ in range(max_tokens):
            if step_logits is not None:
                step_logits.append(logits)
            token = self._choose(logits, temperature, rng)
            result.token_ids.append(token)
            if token in stop_token_ids:
                result.finish_reason = "stop"
                break
            if len(result.token_ids) == max_tokens:
                break
            position, index = position + 1, index + 1
            logits = self._decode(token, position, index - 1, attention)
        return result

    def _decode(self, token: int, position: int, index: int, attention: ContiguousAttention) -> np.ndarray:
        batch = TokenBatch(token_ids=np.array([token]), position_ids=np.array([position]),
                           vision_expert=np.zeros(1, bool), logits_positions=np.array([0]))
        attention.begin_step(batch, np.array([index]))
        return self.model.forward(batch, attention).asnumpy()[0]

    @staticmethod
    def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
        if temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        return int(rng.choice(probs.shape[0], p=probs))


@dataclass
class GenerationOutput:
    """What `cogvlm2 generate --json` prints. `token_ids` exclude the stop token that ended generation."""
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str

    def to_dict(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason}


class SimplePipeline:
    """Processor + model + simple generation loop for one conversation at a time."""

    def __init__(self, model: str | None = None, tokenizer: str | None = None, config_yaml: str | None = None,
                 kernels: str = "reference"):
        from cogvlm2.model_source import resolve_model
        from cogvlm2.processor import CogVLM2Processor
        from cogvlm2.tokenizer import Llama3Tokenizer
        source = resolve_model(model, config_yaml)
        self.config = source.config
        self.tokenizer = Llama3Tokenizer.from_file(tokenizer) if tokenizer else Llama3Tokenizer.for_model_dir(
            source.model_dir)
        self.processor = CogVLM2Processor(source.config, self.tokenizer)
        from kernels.registry import get_kernels
        self.generator = SimpleGenerator(CogVLM2Model.from_source(source, get_kernels(kernels)))

    def generate(self, prompt: str, image=None, history=None, template: str | None = None, max_tokens: int = 64,
                 temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False) -> GenerationOutput:
        processed = self.processor(prompt, image=image, history=history, template=template)
        stops = () if ignore_eos else self.config.eos_token_ids
        result = self.generator.generate(processed, max_tokens, stops, temperature, seed)
        tokens = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
        return GenerationOutput(result.prompt_token_ids, tokens,
                                self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip(),
                                result.finish_reason)
