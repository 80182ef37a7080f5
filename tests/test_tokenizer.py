"""Llama3Tokenizer: goldens, special tokens, file formats (tiktoken and HF tokenizer.json), pickling, long inputs."""
from __future__ import annotations

import base64
import json
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cogvlm2.errors import CheckpointError, CheckpointNotFoundError, InputError
from cogvlm2.tokenizer import (MAX_RUN_CHARS, Llama3Tokenizer, gpt2_byte_to_unicode, llama3_special_tokens,
                               split_for_encoding)

FIXTURE = Path(__file__).parent / "fixtures" / "cogvlm2-tiny"
GOLDENS = json.loads((FIXTURE / "goldens.json").read_text(encoding="utf-8"))
TOKENIZER_CASES = GOLDENS["tokenizer"]


@pytest.fixture(scope="module")
def tok() -> Llama3Tokenizer:
    return Llama3Tokenizer.default()


@pytest.fixture(scope="module")
def hf_json_path(tmp_path_factory: pytest.TempPathFactory, tok: Llama3Tokenizer) -> Path:
    """The default tokenizer exported as a Hugging Face byte-level BPE tokenizer.json."""
    byte_to_char = gpt2_byte_to_unicode()
    vocab = {"".join(byte_to_char[b] for b in token): rank for token, rank in tok.mergeable_ranks.items()}
    added = [{"id": i, "content": name, "special": True} for name, i in tok.special_tokens.items()]
    raw = {"version": "1.0", "added_tokens": added,
           "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def write_tiny_tiktoken_model(path: Path) -> None:
    """256 byte tokens plus the merge 'He' (rank 256)."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines.append(f"{base64.b64encode(b'He').decode()} 256")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=[repr(c["text"][:20]) for c in TOKENIZER_CASES])
def test_encode_matches_goldens(tok: Llama3Tokenizer, case: dict) -> None:
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["text"]


def test_special_token_ids_and_names(tok: Llama3Tokenizer) -> None:
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
                "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004,
                "<|step_id|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|image|>": 128011,
                "<|reserved_special_token_2|>": 128012, "<|reserved_special_token_245|>": 128255}
    for name, token_id in expected.items():
        assert tok.special_token_id(name) == token_id
        assert tok.id_to_special_name(token_id) == name
        assert tok.is_special(token_id)
    assert len(tok.special_tokens) == 256
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    assert tok.bos_id == 128000
    assert tok.eos_ids == (128001, 128009)
    assert tok.vocab_size == 128256
    assert tok.id_to_special_name(9906) is None
    assert not tok.is_special(127999)
    with pytest.raises(InputError, match="no_such_token"):
        tok.special_token_id("<|no_such_token|>")


def test_special_strings_in_text_stay_plain_text(tok: Llama3Tokenizer) -> None:
    text = "<|begin_of_text|><|eot_id|><|start_header_id|>user<|end_header_id|>"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text


def test_decode_special_tokens_and_skip(tok: Llama3Tokenizer) -> None:
    ids = [128000] + tok.encode("Hello world") + [128009]
    assert tok.decode(ids) == "<|begin_of_text|>Hello world<|eot_id|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"


def test_token_bytes_rebuild_text_including_split_utf8(tok: Llama3Tokenizer) -> None:
    text = "emoji 🙂👍🏽 中文"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces).decode("utf-8") == text
    # some emoji tokens are partial UTF-8 sequences: decode replaces, not raises
    partial = [i for i, p in zip(ids, pieces) if not _is_utf8(p)]
    assert partial, "expected at least one token that is not valid UTF-8 on its own"
    assert "\ufffd" in tok.decode(partial[:1])
    assert tok.token_bytes(128009) == b"<|eot_id|>"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_out_of_vocab_ids_raise(tok: Llama3Tokenizer) -> None:
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([1, 128256])
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.token_bytes(-1)


def test_encode_rejects_non_str(tok: Llama3Tokenizer) -> None:
    with pytest.raises(InputError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_default_is_cached_and_pickles_cheaply(tok: Llama3Tokenizer) -> None:
    assert Llama3Tokenizer.default() is tok
    data = pickle.dumps(tok)
    assert len(data) < 1000  # the recipe, not the 128k-entry tables
    assert pickle.loads(data) is tok


def test_thread_safe_encoding(tok: Llama3Tokenizer) -> None:
    texts = [c["text"] for c in TOKENIZER_CASES] * 8
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(tok.encode, texts))
    assert results == [c["ids"] for c in TOKENIZER_CASES] * 8


def test_hf_tokenizer_json_matches_tiktoken_model(tok: Llama3Tokenizer, hf_json_path: Path) -> None:
    hf = Llama3Tokenizer.from_file(hf_json_path)
    assert hf.vocab_size == 128256
    assert hf.bos_id == 128000 and hf.eos_ids == (128001, 128009)
    assert hf.special_tokens == tok.special_tokens
    for case in TOKENIZER_CASES:
        assert hf.encode(case["text"]) == case["ids"]
        assert hf.decode(case["ids"]) == case["text"]
    restored = pickle.loads(pickle.dumps(hf))
    assert restored.encode("Hello world") == [9906, 1917]


def test_for_model_dir_prefers_dir_file(tmp_path: Path, hf_json_path: Path, tok: Llama3Tokenizer) -> None:
    assert Llama3Tokenizer.for_model_dir(None) is tok
    assert Llama3Tokenizer.for_model_dir(tmp_path) is tok  # empty folder: default
    write_tiny_tiktoken_model(tmp_path / "tokenizer.model")
    tiny = Llama3Tokenizer.for_model_dir(tmp_path)
    assert tiny.vocab_size == 257 + 256
    assert tiny.bos_id == 257 and tiny.eos_ids == (258, 257 + 9)
    assert tiny.encode("Hey") == [256, ord("y")]
    assert tiny.decode([256, ord("y")]) == "Hey"


def test_llama3_special_tokens_numbering() -> None:
    specials = llama3_special_tokens(100)
    assert specials["<|begin_of_text|>"] == 100
    assert specials["<|reserved_special_token_245|>"] == 355
    assert len(specials) == 256


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        Llama3Tokenizer.from_file(tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError):
        Llama3Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_malformed_tokenizer_files(tmp_path: Path) -> None:
    bad_model = tmp_path / "tokenizer.model"
    bad_model.write_text("SGVsbG8= 0\nnot base64!! 1\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="line 2"):
        Llama3Tokenizer.from_file(bad_model)
    empty = tmp_path / "empty.model"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(CheckpointError, match="no tokens"):
        Llama3Tokenizer.from_file(empty)
    not_json = tmp_path / "broken.json"
    not_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Llama3Tokenizer.from_file(not_json)
    wordpiece = tmp_path / "wordpiece.json"
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="WordPiece"):
        Llama3Tokenizer.from_file(wordpiece)
    sentencepiece = tmp_path / "sp.json"
    sentencepiece.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"\u2581the": 0}}}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="byte-level"):
        Llama3Tokenizer.from_file(sentencepiece)


def test_long_runs_are_split_and_round_trip(tok: Llama3Tokenizer) -> None:
    text = "x" * (2 * MAX_RUN_CHARS + 17) + " " * (MAX_RUN_CHARS + 3) + "end"
    pieces = list(split_for_encoding(text))
    assert "".join(pieces) == text
    assert len(pieces) == 4
    for piece in pieces:
        assert max(len(run) for run in re.findall(r"\s+|\S+", piece)) <= MAX_RUN_CHARS
    assert tok.decode(tok.encode(text)) == text
    assert list(split_for_encoding("short text")) == ["short text"]
