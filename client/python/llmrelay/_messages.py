"""Chat messages from plain values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias

from llmrelay import v1 as pb
from llmrelay._options import built, named

# "user" for ROLE_USER, and so on: read from the contract, so a role added there is accepted here.
_ROLES: Final[Mapping[str, pb.Role.ValueType]] = {
    name.removeprefix("ROLE_").lower(): value for name, value in pb.Role.items() if value != pb.ROLE_UNSPECIFIED
}

MessageLike: TypeAlias = "pb.Message | Mapping[str, Any]"
"""A message, or its fields as a dict with the role by name: {"role": "user", "content": "Hello"}."""


def message(role: str, content: str, **fields: Any) -> pb.Message:
    """A chat message from plain values: message("user", "Hello")."""
    return _message("", role, content, **fields)


def _message(where: str, /, role: str, content: str, **fields: Any) -> pb.Message:
    """`message`, a field it refuses named after `where`, the message's path in the request ("messages[2].")."""
    return built(pb.Message, {"role": named("role", _ROLES, role), "content": content, **fields}, where)


def as_messages(messages: Iterable[MessageLike], start: int = 0) -> list[pb.Message]:
    """The messages as pb.Message; a field refused is named by its message's place, counted from `start` (where they
    go after others: Conversation.add)."""
    if isinstance(messages, str | bytes):  # else each of its characters would be taken for a message
        raise TypeError(f"messages: a list of messages, not {type(messages).__name__}: [message('user', text)]")
    return [_as_message(m, f"messages[{i}].") for i, m in enumerate(messages, start)]


def _as_message(value: MessageLike, where: str) -> pb.Message:
    if isinstance(value, pb.Message):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"a message is a pb.Message or a dict of its fields ({{'role': 'user', 'content': 'Hello'}}), not"
            f" {type(value).__name__}"
        )
    # A dict may leave content out, as the message may: an assistant's tool calls alone, a user's parts.
    return _message(where, **{"content": "", **value})
