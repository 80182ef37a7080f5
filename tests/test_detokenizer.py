import numpy as np
import pytest

from engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer


class ByteTokenizer:
    """Token i < 256 is the single byte i; a few multi-byte tokens; two special tokens that decode to their names."""

    PIECES = {256: b"Hello", 257: b" wor", 258: b"ld", 259: "é".encode()[:1], 260: "é".encode()[1:] + b"!",
              261: "🙂".encode()[:3], 262: "🙂".encode()[3:]}
    SPECIAL = {300: b"<|eot_id|>", 301: b"<|start|>"}

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        return self.PIECES.get(token_id) or self.SPECIAL[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.SPECIAL

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        data = b"".join(self.token_bytes(i) for i in ids if not (skip_special_tokens and self.is_special(i)))
        return data.decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def text_ids(text: str) -> list[int]:
    return list(text.encode())


def run(ids: list[int], stop: list[str] = (), skip_special_tokens: bool = True,
        include_stop: bool = False) -> tuple[list[DetokenizerUpdate], str, IncrementalDetokenizer]:
    """Feed all ids (stopping early on a stop string), flush, and check deltas add up to the final text."""
    detok = IncrementalDetokenizer(TOK, skip_special_tokens, list(stop), include_stop)
    updates = []
    for token in ids:
        updates.append(detok.add_token(token))
        if updates[-1].stopped:
            break
    tail = detok.flush()
    deltas = "".join(u.new_text for u in updates) + tail
    assert deltas == detok.text
    return updates, tail, detok


def test_plain_text_streams_token_by_token():
    updates, tail, detok = run([256, 257, 258])
    assert [u.new_text for u in updates] == ["Hello", " wor", "ld"]
    assert tail == "" and detok.text == "Hello world" == TOK.decode([256, 257, 258])
    assert not any(u.stopped for u in updates)


def test_multibyte_characters_split_across_tokens_are_held_until_complete():
    ids = [256, 259, 260, 261, 262]  # "Hello" + é split in two + "!" + 🙂 split 3/1
    updates, _, detok = run(ids)
    assert [u.new_text for u in updates] == ["Hello", "", "é!", "", "🙂"]
    assert detok.text == TOK.decode(ids)


def test_single_byte_tokens_of_a_four_byte_character():
    ids = text_ids("a🙂b")
    updates, _, detok = run(ids)
    assert [u.new_text for u in updates] == ["a", "", "", "", "🙂", "b"]
    assert "\ufffd" not in "".join(u.new_text for u in updates)


def test_incomplete_bytes_at_the_end_are_replaced_on_flush():
    updates, tail, detok = run([256, 261])
    assert [u.new_text for u in updates] == ["Hello", ""]
    assert tail == "\ufffd" and detok.text == "Hello\ufffd"


def test_stop_string_spanning_three_tokens():
    detok = IncrementalDetokenizer(TOK, True, ["lo world"])
    first, second, third = (detok.add_token(t) for t in [256, 257, 258])  # "Hello" | " wor" | "ld"
    assert first.new_text == "Hel"  # "lo" could start the stop string
    assert second.new_text == "" and not second.stopped
    assert third.stopped and third.stop_reason == "lo world" and third.new_text == ""
    assert detok.text == "Hel" and detok.flush() == ""


def test_stop_string_over_single_byte_tokens():
    updates, tail, detok = run([256] + text_ids("xxSTOPyy"), stop=["STOP"])
    assert updates[-1].stopped and updates[-1].stop_reason == "STOP" and len(updates) == 7
    assert detok.text == "Helloxx" and tail == ""


def test_stop_string_at_the_very_start():
    updates, tail, detok = run(text_ids("##rest"), stop=["##"])
    assert len(updates) == 2 and updates[1].stopped and updates[1].stop_reason == "##"
    assert detok.text == "" and tail == ""


def test_earliest_of_two_stop_strings_wins():
    _, _, detok = run(text_ids("one two three"), stop=["three", "two"])
    assert detok.text == "one " and detok.stop_reason == "two"
    # A match completed first ends generation even if a longer stop string started earlier.
    _, _, detok = run(text_ids("abcde"), stop=["abcd", "bc"])
    assert detok.text == "a" and detok.stop_reason == "bc"


def test_two_stop_strings_completed_by_the_same_token_pick_the_earliest_start():
    detok = IncrementalDetokenizer(TOK, True, ["ld", "wor"])
    detok.add_token(256)
    update = detok.add_token(257)
    assert update.stopped and update.stop_reason == "wor" and detok.text == "Hello "


def test_include_stop_string_in_output():
    updates, _, detok = run(text_ids("say END now"), stop=["END"], include_stop=True)
    assert updates[-1].stopped and detok.text == "say END"


def test_partial_stop_prefix_is_held_back_then_released():
    detok = IncrementalDetokenizer(TOK, True, ["<end>"])
    deltas = [detok.add_token(t).new_text for t in text_ids("a<en")]
    assert deltas == ["a", "", "", ""]
    assert detok.add_token(ord("x")).new_text == "<enx"  # no longer a possible stop string
    assert detok.add_token(ord("<")).new_text == ""
    assert detok.flush() == "<" and detok.text == "a<enx<"


def test_held_back_text_is_released_by_flush():
    detok = IncrementalDetokenizer(TOK, True, ["\n\n"])
    assert detok.add_token(256).new_text == "Hello"
    assert detok.add_token(ord("\n")).new_text == ""
    assert detok.flush() == "\n" and detok.text == "Hello\n"
    assert not detok.stopped


def test_special_tokens_skipped_or_kept():
    ids = [301, 256, 300]
    _, _, skipped = run(ids, skip_special_tokens=True)
    assert skipped.text == "Hello" == TOK.decode(ids, skip_special_tokens=True)
    _, _, kept = run(ids, skip_special_tokens=False)
    assert kept.text == "<|start|>Hello<|eot_id|>" == TOK.decode(ids)


def test_kept_special_token_can_match_a_stop_string():
    updates, _, detok = run([256, 300, 257], stop=["<|eot_id|>"], skip_special_tokens=False)
    assert updates[-1].stopped and detok.text == "Hello" and len(updates) == 2


def test_no_tokens_after_stop_change_anything():
    detok = IncrementalDetokenizer(TOK, True, ["l"])
    assert detok.add_token(256).stopped
    later = detok.add_token(257)
    assert later.stopped and later.new_text == "" and detok.flush() == "" and detok.text == "He"


@pytest.mark.parametrize("seed", range(50))
def test_deltas_always_concatenate_to_the_final_text(seed):
    rng = np.random.default_rng(seed)
    alphabet = text_ids("ab \n") + [256, 257, 258, 259, 260, 261, 262, 300, 301, 0xE2, 0x82, 0xAC, 0xFF]
    ids = rng.choice(alphabet, size=40).tolist()
    stops = [s for s in ["ab", "b\n", "Hello w", "aaa", "\ufffd"] if rng.random() < 0.5]
    skip = bool(rng.random() < 0.5)
    updates, tail, detok = run(ids, stops, skip)
    full = TOK.decode(ids, skip_special_tokens=skip)
    if detok.stopped:
        cut = min(full.find(s) for s in stops if s in full)
        assert detok.text == full[:cut] and detok.stop_reason in stops
    else:
        assert detok.text == full
    streamed = ""
    for update in updates:  # no delta ever contains a stop string
        streamed += update.new_text
        assert not any(s in streamed for s in stops)
