"""The completion options as typed keyword arguments (every field of llmrelay.v1.CompletionOptions), and their
conversion to the message."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, TypedDict, TypeVar

from google.protobuf.message import Message

from llmrelay import v1 as pb

ToolChoice: TypeAlias = "Literal['none', 'auto', 'required'] | str | pb.ToolChoice"
"""A mode ("none": no tool; "auto": the model decides; "required": at least one tool), any other text: the name of
the one function the model must call."""
ReasoningEffort: TypeAlias = Literal["none", "minimal", "low", "medium", "high"]
"""How hard a reasoning model thinks."""
ToolLike: TypeAlias = "pb.Tool | Mapping[str, Any]"
ResponseFormatLike: TypeAlias = "pb.ResponseFormat | Mapping[str, Any]"


class RunToolsOptions(TypedDict, total=False):
    """The completion options but `tools`, as keywords of run_tools (which takes its tools as a Tools)."""

    temperature: float
    """Sampling temperature, from 0 to 2."""
    top_p: float
    """Nucleus sampling mass, from 0 to 1."""
    max_tokens: int
    """The most tokens the answer may have; at least 1."""
    stop: str | Sequence[str]
    """Up to 4 sequences at which the model stops (one may be given as a plain string, as OpenAI takes it)."""
    seed: int
    """A seed for deterministic sampling, where the upstream supports it."""
    response_format: ResponseFormatLike
    """The shape of the answer: json_schema(...), a pb.ResponseFormat, or its fields as a dict."""
    tool_choice: ToolChoice
    """Which tool the model may or must call: "none", "auto", "required", or a function's name."""
    reasoning_effort: ReasoningEffort
    """How hard a reasoning model thinks: "none", "minimal", "low", "medium" or "high"."""
    presence_penalty: float
    """Penalty for tokens already present, from -2 to 2."""
    frequency_penalty: float
    """Penalty for tokens by their frequency so far, from -2 to 2."""
    parallel_tool_calls: bool
    """Whether the model may call several tools in one turn."""


class CompletionOptions(RunToolsOptions, total=False):
    """Sampling and output options (every field of llmrelay.v1.CompletionOptions), as keywords of complete(),
    stream() and collect(); those left out are not sent, and the upstream's defaults apply. Named as in OpenAI's chat
    completions."""

    tools: Sequence[ToolLike]
    """The tools the model may call: tool(...), Tools.definitions(), pb.Tool, or a dict of its fields."""


OPTION_NAMES: Final = CompletionOptions.__optional_keys__
_TOOL_CHOICE_MODES: Final[Mapping[str, pb.ToolChoiceMode.ValueType]] = {
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
# "low" for REASONING_EFFORT_LOW, "json_object" for RESPONSE_FORMAT_TYPE_JSON_OBJECT, and so on: read from the
# contract.
_REASONING_EFFORTS: Final[Mapping[str, pb.ReasoningEffort.ValueType]] = {
    name.removeprefix("REASONING_EFFORT_").lower(): value
    for name, value in pb.ReasoningEffort.items()
    if value != pb.REASONING_EFFORT_UNSPECIFIED
}
_RESPONSE_FORMAT_TYPES: Final[Mapping[str, pb.ResponseFormatType.ValueType]] = {
    name.removeprefix("RESPONSE_FORMAT_TYPE_").lower(): value
    for name, value in pb.ResponseFormatType.items()
    if value != pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED
}

_K = TypeVar("_K")
_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)
_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 60


def named(what: str, choices: Mapping[_K, _T], name: object) -> _T:
    """What `name` stands for among `choices` (the words the SDK takes for an enum of the contract); for any other, a
    ValueError that lists them."""
    try:
        return choices[name]  # type: ignore[index]  # any other object is refused below
    except (KeyError, TypeError):  # TypeError: a name that cannot be a key at all (a list)
        raise ValueError(f"unknown {what} {name!r}; use one of {', '.join(map(str, choices))}") from None


def built(message_type: type[_M], fields: Mapping[str, Any], where: str = "") -> _M:
    """message_type(**fields), with a field protobuf refuses named in the error (its words alone, such as "bad argument
    type for built-in operation" or "Value out of range: 99999999999", do not say which of the fields it was), after
    `where` (the message's own path in the request, such as "messages[2]."). Text that is not UTF-8 is a ValueError
    that names its field (and which of a list's texts: "inputs[2]", as the gateway and the Go SDK name it) and shows
    none of the text (a prompt, which may hold anything)."""
    try:
        return message_type(**fields)
    except (TypeError, ValueError, AttributeError) as error:
        for name, value in fields.items():
            try:
                message_type(**{name: value})
            except UnicodeError as refused:
                # Not type(refused)(...): a UnicodeEncodeError takes five arguments, and that TypeError named no field.
                field = f"{where}{name}{_which_text(value)}"
                raise ValueError(f"{field}: not valid UTF-8 text ({_not_utf8(refused)})") from None
            except (TypeError, ValueError) as refused:
                raise type(refused)(f"{where}{name}={_shown.repr(value)}: {refused}") from None
            except AttributeError:  # protobuf reads a Struct field's value (a schema) as a dict, calling its items()
                raise TypeError(f"{where}{name}={_shown.repr(value)}: a schema must be a dict, or JSON text") from None
        raise error


def _which_text(value: object) -> str:
    """ "[i]" for the first text of a list that UTF-8 cannot hold; "" for a value that is no list of texts."""
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if isinstance(item, str | bytes) and not _is_utf8(item):
                return f"[{i}]"
    return ""


def _is_utf8(text: str | bytes) -> bool:
    try:
        text.encode() if isinstance(text, str) else text.decode()
    except UnicodeError:
        return False
    return True


def _not_utf8(error: UnicodeError) -> str:
    """What in a text UTF-8 cannot hold, by the one character or byte (never the text around it)."""
    if isinstance(error, UnicodeEncodeError):  # UTF-8 encodes every character but a lone surrogate
        found = ascii(error.object[error.start])[1:-1]
        return f"a lone surrogate such as {found}, from bytes decoded with surrogateescape"
    if isinstance(error, UnicodeDecodeError):
        return f"bytes that are not UTF-8, such as 0x{error.object[error.start]:02x}"
    return error.__class__.__name__


def completion_options(options: CompletionOptions) -> pb.CompletionOptions | None:
    """The message of the options given (None when none is: the backend's defaults)."""
    if not options:
        return None
    fields: dict[str, Any] = dict(options)
    unknown = sorted(set(fields) - OPTION_NAMES)
    if unknown:
        known = ", ".join(sorted(OPTION_NAMES))
        raise TypeError(f"unknown completion option(s) {', '.join(unknown)}; the options are: {known}")
    if isinstance(fields.get("stop"), str):  # one sequence, not one per character
        fields["stop"] = [fields["stop"]]
    if "tools" in fields:
        fields["tools"] = [_text_tool(t, i) if isinstance(t, Mapping) else t for i, t in enumerate(fields["tools"])]
    if "response_format" in fields:
        fields["response_format"] = response_format_message(fields["response_format"])
    if isinstance(choice := fields.get("tool_choice"), str):
        fields["tool_choice"] = _tool_choice(choice)
    if isinstance(effort := fields.get("reasoning_effort"), str):
        fields["reasoning_effort"] = named("reasoning_effort", _REASONING_EFFORTS, effort)
    return built(pb.CompletionOptions, fields)


def _tool_choice(choice: str) -> pb.ToolChoice:
    mode = _TOOL_CHOICE_MODES.get(choice)
    return pb.ToolChoice(mode=mode) if mode is not None else pb.ToolChoice(function_name=choice)


def json_text(schema: Mapping[str, Any] | str) -> str:
    # Schemas travel as JSON text, which the upstream gets as written: the deprecated Struct fields would turn every
    # integer into a double (`maxItems: 3` into 3.0) and lose large ones.
    return schema if isinstance(schema, str) else json.dumps(schema)


def _text_tool(value: Mapping[str, Any], index: int) -> pb.Tool:
    function = dict(value.get("function") or {})
    if isinstance(function.get("parameters"), Mapping | str):  # as tool() takes them: a dict, or JSON text
        function["parameters_json"] = json_text(function.pop("parameters"))
    return pb.Tool(function=built(pb.FunctionDefinition, function, f"tools[{index}].function."))


def response_format_message(value: ResponseFormatLike) -> pb.ResponseFormat:
    """An answer format as the options take it: json_schema(...), a pb.ResponseFormat, or its fields as a dict."""
    return _text_response_format(value) if isinstance(value, Mapping) else value


def _text_response_format(value: Mapping[str, Any]) -> pb.ResponseFormat:
    fields = dict(value)
    # Its type by the short name ("json_object"), as OpenAI's dict has it; the contract's own name is taken too.
    if isinstance(kind := fields.get("type"), str) and kind not in pb.ResponseFormatType.DESCRIPTOR.values_by_name:
        fields["type"] = named("response_format type", _RESPONSE_FORMAT_TYPES, kind)
    schema = dict(fields.get("json_schema") or {})
    if isinstance(schema.get("schema"), Mapping | str):  # as json_schema() takes it: a dict, or JSON text
        schema["schema_json"] = json_text(schema.pop("schema"))
        fields["json_schema"] = schema
    return built(pb.ResponseFormat, fields, "response_format.")
