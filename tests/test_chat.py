"""cogvlm2.chat: OpenAI-style message dicts -> CogVLM2 query, history and image URL, and each bad conversation's
MessagesError naming the offending field."""
from __future__ import annotations

from typing import Any

import pytest

from cogvlm2.chat import Conversation, conversation_from_messages
from cogvlm2.errors import InputError, MessagesError, TooManyImagesError

IMAGE = "data:image/png;base64,iVBORw0KGgo="


def user(text: str, *image_urls: str) -> dict[str, Any]:
    if not image_urls:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}] +
            [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def test_a_conversation_becomes_query_history_and_image():
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "developer", "content": "Be kind."},
                user("How many shapes?", IMAGE), assistant("two"), user("What colour is the background?"),
                assistant("grey"), user("Describe the image.")]
    assert conversation_from_messages(messages) == Conversation(
        query="Describe the image.",
        history=[("Answer briefly.\nBe kind.\nHow many shapes?", "two"), ("What colour is the background?", "grey")],
        image_url=IMAGE)


def test_single_user_message_and_content_forms():
    assert conversation_from_messages([user("Hi")]) == Conversation("Hi", [], None)
    parts = {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"},
                                         {"type": "image_url", "image_url": {"url": IMAGE, "detail": None}}]}
    assert conversation_from_messages([parts]) == Conversation("first\nsecond", [], IMAGE)
    assert conversation_from_messages([{"role": "user", "content": None}]) == Conversation("", [], None)


def test_the_server_schemas_dumps_are_accepted():
    from engine.entrypoints.protocol import ChatCompletionRequest
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "Be brief."}, user("How many shapes?", IMAGE), assistant("two"), user("Why?")]})
    conversation = conversation_from_messages([message.model_dump() for message in request.messages])
    assert conversation == Conversation("Why?", [("Be brief.\nHow many shapes?", "two")], IMAGE)


BAD_CONVERSATIONS = {
    "no messages": ([], "messages", MessagesError),
    "only a system message": ([{"role": "system", "content": "Be brief."}], "messages", MessagesError),
    "starts with assistant": ([assistant("Hi"), user("Hi")], "messages.0.role", MessagesError),
    "two users in a row": ([user("a"), user("b")], "messages.1.role", MessagesError),
    "system after a user": ([user("a"), {"role": "system", "content": "x"}, user("b")], "messages.1.role",
                            MessagesError),
    "ends with assistant": ([user("a"), assistant("b")], "messages", MessagesError),
    "unknown role": ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "messages.1.role",
                     MessagesError),
    "missing role": ([{"content": "a"}], "messages.0.role", MessagesError),
    "not a dict": (["hello"], "messages.0", MessagesError),
    "content not str or list": ([{"role": "user", "content": 5}], "messages.0.content", MessagesError),
    "unknown part": ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}],
                     "messages.0.content.1", MessagesError),
    "image part without url": ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                               "messages.0.content.0", MessagesError),
    "image in an assistant message": ([user("a"), {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": IMAGE}}]}, user("b")], "messages.1.content", MessagesError),
    "image in a system message": ([{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": IMAGE}}]}, user("a")], "messages.0.content", MessagesError),
    "two images in one message": ([user("a", IMAGE, IMAGE)], "messages", TooManyImagesError),
    "images in two turns": ([user("a", IMAGE), assistant("b"), user("c", IMAGE)], "messages", TooManyImagesError),
}


@pytest.mark.parametrize("case", list(BAD_CONVERSATIONS))
def test_each_bad_conversation_names_its_param(case):
    messages, param, error = BAD_CONVERSATIONS[case]
    with pytest.raises(error) as caught:
        conversation_from_messages(messages)
    assert caught.value.param == param and str(caught.value)


def test_messages_must_be_a_list():
    for bad in ("hello", {"role": "user", "content": "hi"}, None):
        with pytest.raises(MessagesError) as caught:
            conversation_from_messages(bad)
        assert caught.value.param == "messages"
    assert issubclass(MessagesError, InputError) and issubclass(TooManyImagesError, MessagesError)
