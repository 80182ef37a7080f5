"""Structured outputs (engine/structured_outputs.py): the parameters, the grammars llguidance builds over the
Llama-3 vocabulary, and the engine constraining requests in batches with unconstrained ones."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import TINY, assert_no_leak
from engine import LLM, SamplingParams
from engine.structured_outputs import StructuredOutputsParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["background", "count"],
          "properties": {"background": {"enum": ["grey", "white", "black", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
PICTURES = [str(TINY / f"demo_{k}.png") for k in range(6)]


def valid(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"background", "count"} and value["background"] in SCHEMA["properties"]["background"][
        "enum"] and isinstance(value["count"], int) and 0 <= value["count"] <= 9


@pytest.fixture(scope="module")
def llm():
    with LLM("demo") as engine:
        yield engine


@pytest.mark.parametrize("fields,message", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "JSON schema object"), ({"choice": []}, "choice"), ({"choice": ["a", 3]}, "choice"),
    ({"regex": ""}, "regex"), ({"grammar": 5}, "grammar"), ({"jsn": {}}, "unknown keys"),
])
def test_bad_parameters_name_the_field(fields, message):
    with pytest.raises(ValueError, match=f"structured_outputs.*{message}|{message}.*"):
        SamplingParams(structured_outputs=fields)


def test_parameters_from_a_dict_or_json_text():
    params = SamplingParams(structured_outputs={"json": json.dumps(SCHEMA)}).structured_outputs
    assert isinstance(params, StructuredOutputsParams) and params.json == SCHEMA and params.kind == "json"
    assert params.key() == StructuredOutputsParams(json=SCHEMA).key()


def test_json_schema_outputs_validate_for_every_demo_picture_in_a_mixed_batch(llm):
    constrained = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": SCHEMA})
    free = SamplingParams(temperature=0, max_tokens=12)
    prompts, params = [], []
    for picture in PICTURES:
        prompts += [{"prompt": "Describe the image as JSON.", "image": picture},
                    {"prompt": "How many shapes are there?", "image": picture}]
        params += [constrained, free]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts[1::2], free, use_tqdm=False)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs[0::2]:
        assert out.outputs[0].finish_reason == "stop" and valid(out.outputs[0].text), out.outputs[0].text
    assert [o.outputs[0].token_ids for o in outs[1::2]] == alone  # the unconstrained rows are untouched
    assert_no_leak(llm)


def test_sampled_tokens_obey_the_grammar_at_any_temperature(llm):
    params = [SamplingParams(temperature=1.5, top_k=50, seed=s, max_tokens=40, structured_outputs={"json": SCHEMA})
              for s in range(6)]
    for out in llm.generate(["Say something."] * 6, params, use_tqdm=False):
        assert valid(out.outputs[0].text), out.outputs[0].text


@pytest.mark.parametrize("fields,pattern", [
    ({"regex": "(one|two|three) shapes?"}, r"(one|two|three) shapes?"),
    ({"choice": ["grey", "white", "café (naïve) [x]"]}, r"grey|white|café \(naïve\) \[x\]"),
    ({"grammar": 'start: "answer: " ("yes" | "no")'}, r"answer: (yes|no)"),
])
def test_regex_choice_grammar_and_json_object(llm, fields, pattern):
    out = llm.generate({"prompt": "How many shapes are there?", "image": PICTURES[0]},
                       SamplingParams(temperature=0, max_tokens=30, structured_outputs=fields), use_tqdm=False)[0]
    assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_json_object_is_a_json_object_when_it_completes(llm):
    """Any object: the tiny model rambles inside a string until max_tokens, so a large budget is needed for it to
    close; what it writes is always a prefix of an object."""
    outs = llm.generate(["Who are you?", "Hello"], SamplingParams(temperature=0.8, seed=2, max_tokens=60,
                                                                  structured_outputs={"json_object": True}),
                        use_tqdm=False)
    for out in outs:
        text = out.outputs[0].text
        assert text.startswith("{")
        if out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_every_choice_including_multibyte_text_can_be_produced(llm):
    """The byte-level vocabulary: a choice whose characters span several tokens (and UTF-8 bytes) is reachable,
    and forcing each choice in turn through a one-choice constraint gives it exactly."""
    for choice in ["grey", "café", "naïve ☃", "<|eot_id|> as text"]:
        out = llm.generate("Pick one.", SamplingParams(temperature=0, max_tokens=20,
                                                      structured_outputs={"choice": [choice]}), use_tqdm=False)[0]
        assert out.outputs[0].text == choice and out.outputs[0].finish_reason == "stop"


def test_max_tokens_cuts_a_constrained_request_with_length(llm):
    out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=3, structured_outputs={"json": SCHEMA}),
                       use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3


def test_an_invalid_schema_or_regex_fails_that_request_alone(llm):
    good = SamplingParams(temperature=0, max_tokens=6)
    outs = llm.generate(["Who are you?", "x", "y", "Who are you?"],
                        [good, SamplingParams(structured_outputs={"json": {"type": "objectx"}}),
                         SamplingParams(structured_outputs={"regex": "[a-z"}), good], use_tqdm=False)
    assert "structured_outputs.json" in outs[1].error and "structured_outputs.regex" in outs[2].error
    assert outs[0].outputs[0].token_ids == outs[3].outputs[0].token_ids and outs[0].error is None
    assert not llm.engine.requests


def test_a_schema_is_compiled_once(llm, monkeypatch):
    from engine import structured_outputs
    calls = []
    compile_grammar = structured_outputs._to_grammar
    monkeypatch.setattr(structured_outputs, "_to_grammar", lambda p: calls.append(p.key()) or compile_grammar(p))
    schema = {**SCHEMA, "title": "compiled-once"}
    params = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"json": schema})
    llm.generate(["a", "b", "c"], params, use_tqdm=False)
    llm.generate("d", params, use_tqdm=False)
    assert len(calls) == 1


def test_the_mask_comes_before_temperature_and_truncation(llm):
    """With top_k=1 and a grammar, the one token kept is the best *allowed* one (the mask ran first)."""
    out = llm.generate("Who are you?", SamplingParams(temperature=1.0, top_k=1, seed=0, max_tokens=10,
                                                      structured_outputs={"choice": ["zebra", "yak"]}),
                       use_tqdm=False)[0]
    assert out.outputs[0].text in ("zebra", "yak")


def test_masks_leave_other_rows_and_keep_allowed_logits():
    from cogvlm2.tokenizer import Llama3Tokenizer
    from engine.structured_outputs import GrammarCompiler
    tokenizer = Llama3Tokenizer.default()
    compiler = GrammarCompiler(tokenizer.encoding, 128256, [128001, 128009])
    matcher = compiler.matcher(StructuredOutputsParams(choice=["yes"]))
    logits = np.random.default_rng(0).standard_normal((3, 128256)).astype(np.float32)
    before = logits.copy()
    compiler.apply_masks(logits, [1], [matcher])
    np.testing.assert_array_equal(logits[[0, 2]], before[[0, 2]])
    allowed = np.flatnonzero(np.isfinite(logits[1]))
    assert tokenizer.encode("yes")[0] in allowed and len(allowed) < 10
    np.testing.assert_array_equal(logits[1, allowed], before[1, allowed])
