"""Chat messages from plain values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias

from llmrelay import v1 as pb

# "user" for ROLE_USER, and so on: read from the contract, so a role added there is accepted here.
_ROLES: Final[Mapping[str, pb.Role.ValueType]] = {
    name.removeprefix("ROLE_").lower(): value for name, value in pb.Role.items() if value != pb.ROLE_UNSPECIFIED
}

MessageLike: TypeAlias = "pb.Message | Mapping[str, Any]"
"""A message, or its fields as a dict with the role by name: {"role": "user", "content": "Hello"}."""


def message(role: str, content: str, **fields: Any) -> pb.Message:
    """A chat message from plain values: message("user", "Hello")."""
    try:
        return pb.Message(role=_ROLES[role], content=content, **fields)
    except KeyError:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(_ROLES)}") from None


def as_messages(messages: Iterable[MessageLike]) -> list[pb.Message]:
    # A dict may leave content out, as the message may: an assistant's tool calls alone, a user's parts.
    return [m if isinstance(m, pb.Message) else message(**{"content": "", **m}) for m in messages]
