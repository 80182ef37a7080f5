"""Llama-3 BPE tokenizer on tiktoken: from a tiktoken `tokenizer.model` or a Hugging Face `tokenizer.json`."""
from __future__ import annotations

import base64
import binascii
import importlib.resources
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import tiktoken

from cogvlm2.errors import CheckpointError, CheckpointNotFoundError, InputError

SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
)
BOS_NAME = "<|begin_of_text|>"
EOS_NAMES = ("<|end_of_text|>", "<|eot_id|>")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

# tiktoken panics on very long inputs and is quadratic on very long runs of (non-)whitespace, so encode in pieces.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """The 256 Llama-3 special tokens, numbered right after the base vocabulary."""
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))]
    names = list(NAMED_SPECIAL_TOKENS) + reserved
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (used by HF byte-level BPE vocabularies)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 2 fields")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise CheckpointError(f"tokenizer file {path}: line {line_no} is not 'base64-token rank' ({e})") from e
    if not ranks:
        raise CheckpointError(f"tokenizer file {path} holds no tokens")
    return ranks


def load_hf_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Mergeable ranks and special tokens of a Hugging Face byte-level BPE `tokenizer.json`.
    The ranks are the vocabulary ids (Llama-3's ids are in merge order, as tiktoken requires)."""
    try:
        raw = json.loads(_read_text(path))
        model = raw["model"]
        vocab: dict[str, int] = model["vocab"]
        added: list[dict[str, Any]] = raw.get("added_tokens", [])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"tokenizer file {path} is not a Hugging Face tokenizer.json with model.vocab ({e})") \
            from e
    if model.get("type", "BPE") != "BPE":
        raise CheckpointError(f"tokenizer file {path}: model.type is '{model.get('type')}', expected 'BPE'")
    char_to_byte = {c: b for b, c in gpt2_byte_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        try:
            ranks[bytes(char_to_byte[c] for c in token)] = int(rank)
        except KeyError as e:
            raise CheckpointError(f"tokenizer file {path}: vocab token {token!r} is not in the byte-level BPE "
                                  f"alphabet (not a byte-level tokenizer?)") from e
    base_ids = set(ranks.values())
    specials = {t["content"]: int(t["id"]) for t in added if int(t["id"]) not in base_ids}
    if not ranks:
        raise CheckpointError(f"tokenizer file {path}: model.vocab is empty")
    return ranks, specials


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CheckpointNotFoundError(f"tokenizer file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"tokenizer file {path} cannot be read: {e}") from e


def split_for_encoding(text: str) -> Iterator[str]:
    """Cut `text` so no piece exceeds MAX_ENCODE_CHARS nor holds a (non-)whitespace run over MAX_RUN_CHARS."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:
            yield chunk
            continue
        piece_start = 0
        for run in _RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


class Llama3Tokenizer:
    """Llama-3 tokenizer. Thread-safe (tiktoken is); pickles as the recipe that loads it, not as its tables."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], name: str = "llama3",
                 recipe: tuple[Callable[..., "Llama3Tokenizer"], tuple] | None = None) -> None:
        missing = [n for n in (BOS_NAME, *EOS_NAMES) if n not in special_tokens]
        if missing:
            raise CheckpointError(f"tokenizer '{name}' lacks special tokens {missing}")
        self._encoding = tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks,
                                           special_tokens=special_tokens)
        self._special_ids = dict(special_tokens)
        self._special_names = {i: n for n, i in special_tokens.items()}
        self._vocab_size = max(max(mergeable_ranks.values()), max(special_tokens.values())) + 1
        self._recipe = recipe

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding (what grammar libraries build their token tables from)."""
        return self._encoding

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Llama3Tokenizer":
        """A tiktoken `tokenizer.model` or a Hugging Face `tokenizer.json` (chosen by the `.json` suffix)."""
        path = Path(path)
        recipe = (Llama3Tokenizer.from_file, (str(path),))
        if path.suffix == ".json":
            ranks, specials = load_hf_tokenizer_json(path)
        else:
            ranks = load_tiktoken_ranks(path)
            specials = llama3_special_tokens(len(ranks))
        return cls(ranks, specials, name=path.name, recipe=recipe)

    @classmethod
    def default(cls) -> "Llama3Tokenizer":
        """The `tokenizer.model` shipped in llama-models, loaded once per process."""
        global _DEFAULT
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                ref = importlib.resources.files("llama_models.llama3").joinpath("tokenizer.model")
                with importlib.resources.as_file(ref) as path:
                    tok = cls.from_file(path)
                tok._recipe = (Llama3Tokenizer.default, ())
                _DEFAULT = tok
            return _DEFAULT

    @classmethod
    def for_model_dir(cls, model_dir: str | os.PathLike | None) -> "Llama3Tokenizer":
        """The model folder's own tokenizer file if it has one, else the default Llama-3 tokenizer."""
        if model_dir is not None:
            for name in TOKENIZER_FILES:
                path = Path(model_dir) / name
                if path.is_file():
                    return cls.from_file(path)
        return cls.default()

    def __reduce__(self) -> tuple:
        if self._recipe is None:
            raise TypeError("a Llama3Tokenizer built from in-memory tables cannot be pickled")
        return self._recipe

    # ---- encode / decode ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS; special-token strings in the text are encoded as plain text."""
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in split_for_encoding(text):
            ids.extend(self._encoding.encode(piece, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_names]
        self._check_ids(ids)
        try:
            return self._encoding.decode(ids, errors="replace")
        except KeyError as e:  # an id inside the range that the tables do not define
            raise InputError(f"cannot decode token ids: {e}") from e

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token gives its name), for incremental detokenisation."""
        self._check_ids([token_id])
        try:
            return self._encoding.decode_single_token_bytes(int(token_id))
        except KeyError as e:
            raise InputError(f"cannot decode token id {token_id}: {e}") from e

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {self._vocab_size})")

    # ---- special tokens ----------------------------------------------------------------------------------------
    def special_token_id(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise InputError(f"unknown special token name {name!r}") from None

    def id_to_special_name(self, token_id: int) -> str | None:
        return self._special_names.get(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_names

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_ids)

    @property
    def bos_id(self) -> int:
        return self._special_ids[BOS_NAME]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self._special_ids[n] for n in EOS_NAMES)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """A copy of the BPE ranks (bytes -> id), e.g. to export a tokenizer.json."""
        return dict(self._encoding._mergeable_ranks)


_DEFAULT: Llama3Tokenizer | None = None
_DEFAULT_LOCK = threading.Lock()
