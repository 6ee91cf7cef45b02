"""Embeddings, piece by piece: the /embeddings wire format, request validation and the packed answer, where an
embedding request may go (one model only), its configuration keys, and its prices."""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from llmrelay import v1 as pb
from llmrelay_server import convert
from llmrelay_server.backends import wire
from llmrelay_server.config import ConfigError, Price, RouterConfig, load_config
from llmrelay_server.domain import (
    Attempt,
    AttemptOutcome,
    BackendSpec,
    Cost,
    EmbeddingRequest,
    EmbeddingResponse,
    InvalidRequestError,
    LLMProvider,
    ModelNotFoundError,
    TokenUsage,
)
from llmrelay_server.pricing import PriceTable
from llmrelay_server.router import Router

NAN, INF = float("nan"), float("inf")


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def b64(vector: bytes) -> str:
    return base64.b64encode(vector).decode()


# --- the wire format ------------------------------------------------------------------------------------------------


def test_the_body_asks_for_base64_and_passes_dimensions_only_when_set() -> None:
    assert wire.embedding_body("m", EmbeddingRequest(inputs=("a", "b"))) == {
        "model": "m",
        "input": ["a", "b"],
        "encoding_format": "base64",
    }
    assert wire.embedding_body("m", EmbeddingRequest(inputs=("a",), dimensions=256))["dimensions"] == 256


def test_vectors_are_put_in_input_order_by_index_from_base64_or_numbers() -> None:
    first, second, third = floats(1.0, -2.5), floats(0.125, 3.0), floats(-0.0, 1e-3)
    data = {
        "data": [
            {"index": 2, "embedding": list(struct.unpack("<2f", third))},
            {"index": 0, "embedding": b64(first)},
            {"index": 1, "embedding": b64(second)},
        ]
    }
    assert wire.embedding_vectors(data, 3) == (first, second, third)


def test_every_finite_float_is_a_valid_dimension() -> None:
    # The largest and smallest float32s, a subnormal, negative zero: finite all, however near the infinities.
    extremes = floats(3.4028234663852886e38, -3.4028234663852886e38, 1.4e-45, -0.0)
    assert wire.embedding_vectors({"data": [{"index": 0, "embedding": b64(extremes)}]}, 1) == (extremes,)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ([], "one embedding for each"),
        ({"data": "x"}, "one embedding for each"),
        ({"data": [{"index": 0, "embedding": "AAAAAA=="}]}, "one embedding for each"),  # 1 of 2
        ({"data": [{"embedding": "AACAPw=="}, {"index": 1, "embedding": "AACAPw=="}]}, "`index`"),
        ({"data": [{"index": 0, "embedding": "AACAPw=="}, {"index": 0, "embedding": "AACAPw=="}]}, "`index`"),
        ({"data": [{"index": 0, "embedding": "AACAPw=="}, {"index": 2, "embedding": "AACAPw=="}]}, "`index`"),
        ({"data": [{"index": True, "embedding": "AACAPw=="}, {"index": 1, "embedding": "AACAPw=="}]}, "`index`"),
        ({"data": [{"index": 0, "embedding": "not base64!"}, {"index": 1, "embedding": "AACAPw=="}]}, "base64"),
        # Text beyond ASCII, which the decoder refuses with a ValueError of its own (a failure of the gateway's, then).
        ({"data": [{"index": 0, "embedding": "AACAPw\u00e9="}, {"index": 1, "embedding": "AACAPw=="}]}, "base64"),
        ({"data": [{"index": 0, "embedding": "AACA"}, {"index": 1, "embedding": "AACAPw=="}]}, "whole number"),
        ({"data": [{"index": 0, "embedding": ""}, {"index": 1, "embedding": ""}]}, "whole number"),
        ({"data": [{"index": 0, "embedding": [1.0, "x"]}, {"index": 1, "embedding": [1.0, 2.0]}]}, "32-bit floats"),
        ({"data": [{"index": 0, "embedding": [1e300]}, {"index": 1, "embedding": [1.0]}]}, "32-bit floats"),
        ({"data": [{"index": 0, "embedding": None}, {"index": 1, "embedding": [1.0]}]}, "neither"),
        ({"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]}, "differ"),
        # A model that overflowed (float16 weights, say) answers NaN or infinity: no distance can be taken with it.
        ({"data": [{"index": 0, "embedding": b64(floats(0.5, NAN))}, {"index": 1, "embedding": "AACAPw=="}]}, "NaN"),
        ({"data": [{"index": 0, "embedding": "AACAPw=="}, {"index": 1, "embedding": b64(floats(-INF, 1))}]}, "NaN"),
        ({"data": [{"index": 0, "embedding": b64(floats(INF))}, {"index": 1, "embedding": "AACAPw=="}]}, "NaN"),
    ],
)
def test_a_malformed_answer_is_a_definite_error(data: Any, complaint: str) -> None:
    with pytest.raises(wire.MalformedAnswerError, match=complaint):
        wire.embedding_vectors(data, 2)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"usage": {"prompt_tokens": 7, "total_tokens": 7}}, TokenUsage(prompt_tokens=7, completion_tokens=0)),
        ({"usage": {"total_tokens": 7}}, None),
        ({"usage": {"prompt_tokens": -1}}, None),
        ({}, None),
    ],
)
def test_usage_is_the_prompt_tokens_when_reported(data: dict[str, Any], expected: TokenUsage | None) -> None:
    assert wire.embedding_usage_from(data) == expected


# --- conversion -----------------------------------------------------------------------------------------------------


def violations(request: pb.EmbedRequest) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequestError) as caught:
        convert.embedding_request(request)
    return [(v.field, v.description) for v in caught.value.violations]


def test_a_valid_request_converts() -> None:
    request = pb.EmbedRequest(inputs=["a", "b"], model="m", dimensions=3)
    assert convert.embedding_request(request) == EmbeddingRequest(inputs=("a", "b"), model="m", dimensions=3)
    assert convert.embedding_request(pb.EmbedRequest(inputs=["a"])) == EmbeddingRequest(inputs=("a",))


def test_every_violation_is_named() -> None:
    assert [field for field, _ in violations(pb.EmbedRequest(model="x" * 257, dimensions=-1))] == [
        "model",
        "inputs",
        "dimensions",
    ]
    too_many = pb.EmbedRequest(inputs=["a"] * (convert.MAX_EMBEDDING_INPUTS + 1))
    assert violations(too_many) == [("inputs", "at most 2048 texts a request; send the rest in another")]


def test_every_empty_input_is_named() -> None:
    # How many of them the status reports is InvalidRequestError's business, as for every RPC.
    found = violations(pb.EmbedRequest(inputs=["a", *[""] * 12]))
    assert found == [(f"inputs[{i}]", "must not be empty") for i in range(1, 13)]


def test_the_answer_carries_the_vectors_packed_as_they_came() -> None:
    vectors = (floats(1.0, 2.0, 3.0), floats(-1.5, 0.0, 1e-7))
    attempt = Attempt(backend="b", model="m", outcome=AttemptOutcome.SUCCEEDED, duration_s=0.5)
    usage = TokenUsage(prompt_tokens=5, completion_tokens=0, estimated=True, cost=Cost(usd_micros=3, estimated=True))
    response = EmbeddingResponse(backend="b", model="m", vectors=vectors, usage=usage, attempts=(attempt,))
    message = convert.embed_response(response)
    assert [floats(*e.values) for e in message.embeddings] == list(vectors)
    assert (message.backend, message.model, message.usage.prompt_tokens, message.usage.estimated) == ("b", "m", 5, True)
    assert (message.usage.cost.usd_micros, message.usage.cost.estimated) == (3, True)
    assert [a.outcome for a in message.attempts] == [pb.ATTEMPT_OUTCOME_SUCCEEDED]
    # The same message as one built field by field: the encoding is protobuf's own.
    built = pb.EmbedResponse(backend="b", model="m", usage=message.usage, attempts=message.attempts)
    built.embeddings.extend(pb.Embedding(values=e.values) for e in message.embeddings)
    assert pb.EmbedResponse.FromString(message.SerializeToString()) == built


def test_a_vector_longer_than_a_one_byte_length_encodes_its_length_in_varint() -> None:
    vector = floats(*range(50_000))  # 200,000 bytes: a three-byte length
    response = EmbeddingResponse(backend="b", model="m", vectors=(vector,), usage=TokenUsage(1, 0))
    (embedding,) = convert.embed_response(response).embeddings
    assert floats(*embedding.values) == vector


# --- routing --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedder:
    """Enough of an EmbeddingProvider for routing, which reads the spec and asks whether it can embed."""

    spec: BackendSpec
    connections_all_in_use: bool = False

    async def complete(self, *args: Any, **kwargs: Any) -> Any: ...
    def stream(self, *args: Any, **kwargs: Any) -> Any: ...
    async def count_tokens(self, *args: Any, **kwargs: Any) -> Any: ...
    def answer_tokens_asked(self, *args: Any, **kwargs: Any) -> Any: ...
    async def health(self) -> Any: ...
    async def aclose(self) -> None: ...
    async def embed(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ChatOnly:
    """A provider of a kind that serves no embeddings."""

    spec: BackendSpec


def spec(name: str, embedding: str | None = None, *more: str) -> BackendSpec:
    return BackendSpec(
        name=name,
        kind="openai_compatible",
        base_url=f"http://{name}/v1",
        default_model="chat",
        embedding_model=embedding,
        embedding_models=more,
    )


def router(*specs: BackendSpec, aliases: dict[str, str] | None = None) -> Router:
    return Router(
        [cast(LLMProvider, Embedder(s)) for s in specs],
        config=RouterConfig(),
        counter=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        prices=PriceTable({}, Price(prompt=5.0, completion=15.0)),
        aliases=aliases,
    )


CHAT = spec("chat")
OPENAI = spec("openai", "text-embedding-3-small", "text-embedding-3-large")
AZURE = spec("azure", "text-embedding-3-large", "text-embedding-3-small")
OLLAMA = spec("ollama", "nomic-embed-text")


def routes(r: Router, model: str | None) -> list[tuple[str, str]]:
    return [(route.backend.name, route.model) for route in r.embedding_routes(model)]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # No model: the first backend with an embedding model, its default, then the others serving that model.
        (None, [("openai", "text-embedding-3-small"), ("azure", "text-embedding-3-small")]),
        # A model: every backend configured with it, in routing order, and no other model.
        ("text-embedding-3-large", [("openai", "text-embedding-3-large"), ("azure", "text-embedding-3-large")]),
        ("nomic-embed-text", [("ollama", "nomic-embed-text")]),
        ("nomic-embed-text:latest", [("ollama", "nomic-embed-text:latest")]),
        # A backend-qualified name: that backend alone, with any model (it may serve more than configured).
        ("azure/text-embedding-3-small", [("azure", "text-embedding-3-small")]),
        ("ollama/mxbai-embed-large", [("ollama", "mxbai-embed-large")]),
        # A name with a slash that is no backend's is a model's name.
        ("nomic-ai/nomic-embed-text-v1.5", None),
        ("chat/text-embedding-3-small", None),  # a backend that serves no embeddings
        ("chat", None),  # a chat model is not an embedding model
        ("unknown", None),
    ],
)
def test_where_an_embedding_request_may_go(model: str | None, expected: list[tuple[str, str]] | None) -> None:
    r = router(CHAT, OPENAI, AZURE, OLLAMA)
    if expected is not None:
        assert routes(r, model) == expected
        return
    with pytest.raises(ModelNotFoundError) as caught:
        r.embedding_routes(model)
    assert caught.value.served == (
        "openai/text-embedding-3-small",
        "openai/text-embedding-3-large",
        "azure/text-embedding-3-large",
        "azure/text-embedding-3-small",
        "ollama/nomic-embed-text",
    )


def test_aliases_name_embedding_models_too() -> None:
    r = router(OPENAI, OLLAMA, aliases={"embed": "ollama/nomic-embed-text"})
    assert routes(r, "embed") == [("ollama", "nomic-embed-text")]


def test_without_embedding_models_there_is_no_default() -> None:
    with pytest.raises(ModelNotFoundError):
        router(CHAT).embedding_routes(None)


def test_a_backend_that_cannot_embed_may_not_be_given_an_embedding_model() -> None:
    providers = [cast(LLMProvider, ChatOnly(spec("other", "e")))]
    with pytest.raises(ConfigError, match=r"^backend 'other': a backend of kind \w+ cannot serve embeddings; "):
        Router(providers, config=RouterConfig(), counter=None, ledger=None, prices=None)  # type: ignore[arg-type]


def test_the_budget_estimate_prices_the_embedding_model_that_would_serve() -> None:
    r = router(spec("openai", "text-embedding-3-small"))
    assert r.estimate_embedding_usd_micros(None, 1_000_000, None) == 20_000
    assert r.estimate_embedding_usd_micros("unknown", 1_000_000, None) == 0


# --- configuration and prices ---------------------------------------------------------------------------------------


def load(tmp_path: Path, yaml_text: str) -> tuple[BackendSpec, ...]:
    path = tmp_path / "llmrelay.yaml"
    path.write_text(yaml_text)
    return load_config({}, path).backends


def test_backends_name_their_embedding_models(tmp_path: Path) -> None:
    (ollama, extra) = load(
        tmp_path,
        "llm:\n  ollama: {embedding_model: nomic-embed-text, embedding_models: [mxbai-embed-large]}\n"
        "  backends:\n    - {name: local, kind: llamacpp, base_url: 'http://x/v1', model: tiny}\n",
    )
    assert (ollama.embedding_model, ollama.embedding_models) == ("nomic-embed-text", ("mxbai-embed-large",))
    assert ollama.all_embedding_models == ("nomic-embed-text", "mxbai-embed-large")
    assert (extra.embedding_model, extra.all_embedding_models) == (None, ())


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ("{embedding_models: [a]}", "llm.ollama.embedding_models: the backend serves embeddings only with"),
        ("{embedding_model: ''}", "llm.ollama.embedding_model: empty"),
        ("{embedding_model: a, embedding_models: [b, '']}", r"llm.ollama.embedding_models\[1\]: empty"),
    ],
)
def test_embedding_keys_are_checked(tmp_path: Path, section: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(tmp_path, f"llm:\n  ollama: {section}\n")


@pytest.mark.parametrize(
    ("model", "micros_per_million"), [("text-embedding-3-small", 20_000), ("text-embedding-3-large", 130_000)]
)
def test_openai_embedding_models_have_their_list_prices(model: str, micros_per_million: int) -> None:
    openai = BackendSpec(name="openai", kind="openai", base_url="https://x/v1", default_model="gpt-4o")
    rate = PriceTable({}, Price(prompt=5.0, completion=15.0)).rate(openai, model)
    assert rate.cost(TokenUsage(prompt_tokens=1_000_000, completion_tokens=0)) == Cost(usd_micros=micros_per_million)
