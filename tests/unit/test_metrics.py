"""The gateway keeps its counters and histograms as plain numbers (metrics._Kept): what a scrape reads of them must be
what prometheus-client's own Counter and Histogram would have exposed after the same updates, in either format."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from llmrelay_server.domain import BackendSpec
from llmrelay_server.metrics import CALL_BUCKETS, OTHER, OVERHEAD_BUCKETS, LabelValues, Metrics, StateReading
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

_CREATED = re.compile(r"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def _metrics() -> Metrics:
    return Metrics(LabelValues((), (), lambda: ()), lambda: (), lambda: StateReading([], 0, 0, 0, 0))


def _families(exposition: bytes, *names: str) -> str:
    """The lines of these metric families, creation times masked (each object notes its own)."""
    kept = [line for line in exposition.decode().splitlines() if any(name in line for name in names)]
    return _CREATED.sub(r"\1 T", "\n".join(kept))


@pytest.mark.parametrize("generate", [generate_latest, generate_openmetrics])
def test_counters_and_histograms_read_as_prometheus_clients_own(generate: Callable[[CollectorRegistry], bytes]) -> None:
    ours = _metrics()
    reference = CollectorRegistry()
    labels = ["grpc_type", "grpc_service", "grpc_method"]
    handled = Counter(
        "grpc_server_handled", "RPCs completed on the server, by status.", [*labels, "grpc_code"], registry=reference
    )
    handling = Histogram(
        "grpc_server_handling_seconds",
        "Time from an RPC's start to its end.",
        labels,
        buckets=CALL_BUCKETS,
        registry=reference,
    )
    overhead = Histogram(
        "llmrelay_gateway_overhead_seconds",
        "A call's time not spent waiting for an upstream: the gateway's own cost.",
        ["grpc_method"],
        buckets=OVERHEAD_BUCKETS,
        registry=reference,
    )
    # Values on a bucket's bound (which it includes), between bounds, below the first and above the last.
    for seconds in (0.0, 0.005, 0.0051, 0.1, 0.75, 10.0, 10.5, 1e9):
        ours.handling("unary", "llmrelay.v1.LLMService", "Complete").observe(seconds)
        handling.labels("unary", "llmrelay.v1.LLMService", "Complete").observe(seconds)
    for seconds in (0.0001, 0.00011, 0.3, 2.0):
        ours.overhead("Complete").observe(seconds)
        overhead.labels("Complete").observe(seconds)
    for code, times in (("OK", 3), ("UNAVAILABLE", 1)):
        for _ in range(times):
            ours.handled("unary", "llmrelay.v1.LLMService", "Complete", code).inc()
            handled.labels("unary", "llmrelay.v1.LLMService", "Complete", code).inc()
    ours.handled("server_stream", "llmrelay.v1.LLMService", "StreamComplete", "OK").inc(2.5)
    handled.labels("server_stream", "llmrelay.v1.LLMService", "StreamComplete", "OK").inc(2.5)

    names = ("grpc_server_handled", "grpc_server_handling_seconds", "llmrelay_gateway_overhead_seconds")
    expected = _families(generate(reference), *names)
    assert "grpc_server_handling_seconds_bucket" in expected and 'le="+Inf"' in expected
    assert _families(generate(ours.registry), *names) == expected


def test_a_dated_snapshot_is_labelled_as_the_model_configured() -> None:
    # Every answer of OpenAI's and Anthropic's APIs names its snapshot: their tokens and cost were all filed as "other".
    specs = [
        BackendSpec(name="openai", kind="openai", base_url="http://upstream/v1", default_model="gpt-4o"),
        BackendSpec(name="claude", kind="anthropic", base_url="http://upstream", default_model="claude-sonnet-4-5"),
    ]
    labels = LabelValues(specs, (), lambda: ())
    assert labels.model("gpt-4o-2024-08-06") == "gpt-4o"
    assert labels.model("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert labels.model("gpt-4o-mini-2024-07-18") == OTHER, "a snapshot of a model not configured"
    assert labels.model("gpt-4o-realtime-preview") == OTHER
