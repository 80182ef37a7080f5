"""CogVLM2 processor: prompt template + tokens, image placeholders, token types, position ids and expert routing."""
from __future__ import annotations

import os
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Sequence

import numpy as np

from cogvlm2.config import CogVLM2Config
from cogvlm2.errors import ConfigError, ImageError, InputError, TemplateError
from cogvlm2.image import DEFAULT_MAX_PIXELS, image_content_hash, load_image, preprocess_image
from cogvlm2.model_source import resolve_model
from cogvlm2.tokenizer import Llama3Tokenizer

LANGUAGE_TOKEN = 0
VISION_TOKEN = 1
TEMPLATES = ("chat", "vqa", "base")
_ANSWER_TAG = {"chat": "Answer:", "vqa": "Short answer:"}

History = Sequence[Sequence[str]]


@dataclass
class ProcessedPrompt:
    """Everything the engine needs about one prompt. pixel_values is float32 [3, S, S] when there is an image."""
    prompt_text: str
    input_ids: list[int]
    token_type_ids: list[int]
    position_ids: list[int]
    vision_expert_mask: list[int]
    pixel_values: np.ndarray | None = None
    image_hash: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def format_prompt(query: str, history: list[tuple[str, str]], template: str) -> str:
    """The template text (without BOS and image tokens)."""
    if template == "base":
        return query
    tag = _ANSWER_TAG[template]
    past = "".join(f"Question: {q} {tag} {a}\n" for q, a in history)
    return f"{past}Question: {query} {tag}"


def _inside_image(token_type_ids: Sequence[int], i: int) -> bool:
    """True for a vision token that is neither the first nor the last of its image span."""
    n = len(token_type_ids)
    return (token_type_ids[i] == VISION_TOKEN and 0 < i < n - 1
            and token_type_ids[i - 1] == VISION_TOKEN and token_type_ids[i + 1] == VISION_TOKEN)


def build_position_ids(token_type_ids: Sequence[int]) -> list[int]:
    """+1 per token, except that the tokens strictly inside an image span all share one position."""
    positions: list[int] = []
    pos = -1
    for i in range(len(token_type_ids)):
        if not (i > 0 and _inside_image(token_type_ids, i) and _inside_image(token_type_ids, i - 1)):
            pos += 1
        positions.append(pos)
    return positions


def build_vision_expert_mask(token_type_ids: Sequence[int]) -> list[int]:
    """Token i takes the vision expert iff it and token i+1 are vision tokens (so the last token is language)."""
    tt = token_type_ids
    n = len(tt)
    return [int(tt[i] == VISION_TOKEN and i + 1 < n and tt[i + 1] == VISION_TOKEN) for i in range(n)]


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"'prompt' must be a str, got {type(prompt).__name__}")
    return prompt


def _check_history(history: Any) -> list[tuple[str, str]]:
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise InputError(f"'history' must be a list of (question, answer) string pairs, got "
                         f"{type(history).__name__}")
    pairs = []
    for i, turn in enumerate(history):
        if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                or not all(isinstance(part, str) for part in turn)):
            raise InputError(f"'history' item {i} must be a (question, answer) pair of strings, got {turn!r:.80}")
        pairs.append((turn[0], turn[1]))
    return pairs


def _single_image(image: Any) -> Any:
    """Unwrap a list/tuple of at most one image; None when there is no image."""
    if isinstance(image, (list, tuple)):
        if len(image) > 1:
            raise ImageError(f"only one image per conversation is supported, got {len(image)} images")
        return image[0] if image else None
    return image


class CogVLM2Processor:
    """Turns (prompt, image, history, template) into a ProcessedPrompt, exactly as the reference model expects."""

    def __init__(self, config: CogVLM2Config, tokenizer: Llama3Tokenizer,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not isinstance(max_image_pixels, int) or max_image_pixels <= 0:
            raise ConfigError(f"'max_image_pixels' must be a positive int, got {max_image_pixels!r}")
        if config.template_version not in TEMPLATES:
            raise ConfigError(f"config field 'template_version' is '{config.template_version}', expected one of "
                              f"{list(TEMPLATES)}")
        if tokenizer.bos_id != config.bos_token_id:
            raise ConfigError(f"tokenizer BOS id {tokenizer.bos_id} differs from config field 'bos_token_id' "
                              f"{config.bos_token_id}")
        self.config = config
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_pretrained(cls, model_dir_or_preset: str | os.PathLike | None = None,
                        tokenizer_path: str | os.PathLike | None = None,
                        max_image_pixels: int = DEFAULT_MAX_PIXELS) -> "CogVLM2Processor":
        source = resolve_model(model_dir_or_preset)
        if tokenizer_path is not None:
            tokenizer = Llama3Tokenizer.from_file(tokenizer_path)
        else:
            tokenizer = Llama3Tokenizer.for_model_dir(source.model_dir)
        return cls(source.config, tokenizer, max_image_pixels)

    @property
    def image_placeholder_id(self) -> int:
        return self.config.pad_token_id

    def __call__(self, prompt: str, image: Any = None, history: History | None = None,
                 template: str | None = None) -> ProcessedPrompt:
        query = _check_prompt(prompt)
        pairs = _check_history(history)
        template = self._check_template(template)
        image = _single_image(image)
        text = format_prompt(query, pairs, template)

        return self._assemble([self.tokenizer.bos_id], image, self.tokenizer.encode(text), text)

    def from_token_ids(self, token_ids: Any, image: Any = None) -> ProcessedPrompt:
        """A prompt given as token ids (vLLM's prompt_token_ids), used as they are; an image's tokens go right
        after their leading BOS, where the template puts them."""
        ids = self._check_token_ids(token_ids)
        image = _single_image(image)
        if ids[0] != self.tokenizer.bos_id:
            if image is not None:
                raise InputError(f"'prompt_token_ids' with an image must start with BOS ({self.tokenizer.bos_id}): "
                                 f"the image's tokens follow it")
            return self._assemble([], None, ids, "")
        return self._assemble(ids[:1], image, ids[1:], "")

    def _assemble(self, head: list[int], image: Any, text_ids: list[int], text: str) -> ProcessedPrompt:
        """head (BOS, or nothing), then the image's placeholder tokens, then the text's tokens."""
        input_ids = list(head)
        token_type_ids = [LANGUAGE_TOKEN] * len(head)
        pixel_values = image_hash = None
        if image is not None:
            pixel_values = self.preprocess(image)
            image_hash = image_content_hash(pixel_values)
            n = self.config.tokens_per_image
            input_ids += [self.image_placeholder_id] * n
            token_type_ids += [VISION_TOKEN] * n
        input_ids += text_ids
        token_type_ids += [LANGUAGE_TOKEN] * len(text_ids)
        return ProcessedPrompt(
            prompt_text=text, input_ids=input_ids, token_type_ids=token_type_ids,
            position_ids=build_position_ids(token_type_ids),
            vision_expert_mask=build_vision_expert_mask(token_type_ids),
            pixel_values=pixel_values, image_hash=image_hash)

    def _check_token_ids(self, token_ids: Any) -> list[int]:
        vocab = self.config.vocab_size
        if not isinstance(token_ids, (list, tuple)) or not token_ids or not all(
                isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids):
            raise InputError(f"'prompt_token_ids' must be a non-empty list of token ids in [0, {vocab}), "
                             f"got {str(token_ids)[:80]}")
        return [int(t) for t in token_ids]

    def preprocess(self, image: Any) -> np.ndarray:
        """Load (with the pixel limit) and preprocess one image: float32 [3, S, S]."""
        size = self.config.vision.image_size
        return preprocess_image(load_image(image, self.max_image_pixels, size), size)

    def _check_template(self, template: Any) -> str:
        if template is None:
            return self.config.template_version
        if template not in TEMPLATES:
            raise TemplateError(f"unknown template {template!r}; valid templates: {list(TEMPLATES)}")
        return template
