"""OpenAI-style chat messages -> CogVLM2's query, history and image.

Messages are plain dicts (or pydantic dumps of them): {"role": ..., "content": ...} where content is a str, None,
or a list of parts {"type": "text", "text": ...} / {"type": "image_url", "image_url": {"url": ...}}.
CogVLM2's template has no system slot and takes one image, placed before all text, so:
  * optional system (or developer) messages come first; their text is prepended, with a newline, to the first
    user question;
  * then user and assistant messages alternate, starting and ending with a user message; earlier
    (user, assistant) pairs become the history;
  * at most one image in the whole conversation, and only in a user message.
Each violation raises MessagesError (TooManyImagesError for a second image) whose `param` names the field, in the
OpenAI error style: "messages", "messages.3.role", "messages.2.content".
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cogvlm2.errors import MessagesError, TooManyImagesError

SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant")


@dataclass
class Conversation:
    query: str
    history: list[tuple[str, str]]
    image_url: str | None  # the one image's URL (or path) as the messages gave it; loading it is the caller's job


def conversation_from_messages(messages: Sequence[Mapping[str, Any]]) -> Conversation:
    """The CogVLM2 conversation the messages describe; raises MessagesError (see the module docstring)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise MessagesError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        _check_message(message, i)
    leading = 0
    while leading < len(messages) and messages[leading]["role"] in SYSTEM_ROLES:
        leading += 1
    system = [_text_of(m, i) for i, m in enumerate(messages[:leading])]
    turns = messages[leading:]
    _check_turns(turns, leading)
    image_urls = [url for m in turns for url in _image_urls(m)]
    if len(image_urls) > 1:
        raise TooManyImagesError(f"CogVLM2 takes at most one image per conversation, got {len(image_urls)}")
    texts = [_text_of(m, leading + i) for i, m in enumerate(turns)]
    if system:
        texts[0] = "\n".join(system + [texts[0]])
    history = list(zip(texts[0:-1:2], texts[1:-1:2]))
    return Conversation(texts[-1], history, image_urls[0] if image_urls else None)


def _check_message(message: Any, index: int) -> None:
    """The shape the HTTP schema already enforces, checked again for Python callers."""
    where = f"messages.{index}"
    if not isinstance(message, Mapping):
        raise MessagesError(f"messages[{index}] must be a dict, got {type(message).__name__}", where)
    if message.get("role") not in ROLES:
        raise MessagesError(f"messages[{index}] has role {message.get('role')!r}: expected one of {ROLES}",
                            f"{where}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise MessagesError(f"messages[{index}].content must be a str or a list of parts, got "
                            f"{type(content).__name__}", f"{where}.content")
    for j, part in enumerate(content):
        if not _is_part(part):
            raise MessagesError(f"messages[{index}].content[{j}] must be {{'type': 'text', 'text': str}} or "
                                f"{{'type': 'image_url', 'image_url': {{'url': str}}}}", f"{where}.content.{j}")


def _is_part(part: Any) -> bool:
    if not isinstance(part, Mapping):
        return False
    if part.get("type") == "text":
        return isinstance(part.get("text"), str)
    image_url = part.get("image_url")
    return part.get("type") == "image_url" and isinstance(image_url, Mapping) and \
        isinstance(image_url.get("url"), str)


def _check_turns(turns: Sequence[Mapping[str, Any]], offset: int) -> None:
    if not turns:
        raise MessagesError("messages need at least one user message")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = "system messages must come first" if message["role"] in SYSTEM_ROLES else \
                "user and assistant messages must alternate, starting with user"
            raise MessagesError(f"messages[{offset + i}] has role {message['role']!r}: {where}",
                                f"messages.{offset + i}.role")
    if turns[-1]["role"] != "user":
        raise MessagesError("the last message must be a user message")


def _text_of(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if message["role"] != "user" and any(part["type"] == "image_url" for part in content):
        raise MessagesError(f"messages[{index}]: only user messages may contain images",
                            f"messages.{index}.content")
    return "\n".join(part["text"] for part in content if part["type"] == "text")


def _image_urls(message: Mapping[str, Any]) -> list[str]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
