"""`llmrelay stats` against a running gateway's metrics endpoint: the totals with --once, and the rates between two
scrapes with calls in between."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from llmrelay import v1 as pb
from llmrelay.cli import _quantile, main, parse_metrics, render_stats, scrape
from support import GatewayFactory, chat, page_served, stream_chat, two_backends
from upstream import FakeUpstream


def row(text: str, first: str) -> list[str]:
    found = [line.split() for line in text.splitlines() if line.split()[:1] == [first]]
    assert len(found) == 1, text
    return found[0]


async def test_stats_shows_calls_latency_and_tokens(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await gateway_factory(two_backends(primary, local), server='metrics_listen: "127.0.0.1:0"')
    assert gateway.metrics is not None
    url = f"http://127.0.0.1:{gateway.metrics.port}/metrics"
    before = await asyncio.to_thread(scrape, url)
    # As OpenAI reports them: cached prompt tokens and reasoning tokens, parts of the prompt and the completion.
    details = {"prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}
    primary.inject({"usage": {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10, **details}})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        answers = [await stub.Complete(chat(), timeout=5) for _ in range(3)]
        assert answers[0].usage.cached_prompt_tokens == 4 and answers[0].usage.reasoning_tokens == 2
        chunks = [chunk async for chunk in stub.StreamComplete(stream_chat(), timeout=5)]
    after = await asyncio.to_thread(scrape, url)

    live = render_stats(after, before, seconds=2.0)
    assert "over the last 2.0 s" in live
    complete = row(live, "Complete")
    assert complete[1:3] == ["1.5", "0.0"]  # 3 calls in 2 s, none failed
    assert complete[3] != "-" and complete[5] != "-"  # p50, p99
    tokens = sum(a.usage.total_tokens for a in answers) + chunks[-1].usage.total_tokens
    assert row(live, "openai")[1] == f"{tokens / 2:.1f}"
    assert row(live, "StreamComplete")[1] == "0.5"

    await asyncio.to_thread(main, ["stats", "--metrics", url, "--once"])
    totals = capsys.readouterr().out
    assert "since the gateway started" in totals
    assert row(totals, "Complete")[1:3] == ["3", "0"]
    assert row(totals, "openai")[1] == str(tokens)
    assert re.search(r"^open streams: 0$", totals, re.MULTILINE)


def test_stats_says_when_there_is_no_endpoint() -> None:
    with pytest.raises(SystemExit, match=re.escape("cannot read http://127.0.0.1:9/metrics")):
        main(["stats", "--metrics", "http://127.0.0.1:9/metrics", "--once"])


@pytest.mark.parametrize("url", ["http://admin:S3CRET@127.0.0.1:9/metrics", "http://admin:S3CRET@[::1/metrics"])
def test_stats_never_shows_a_password_in_the_url(url: str) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", url, "--once"])
    said = str(ended.value.code)
    assert "admin:***@" in said and "S3CRET" not in said, said


@pytest.mark.parametrize("url", ["", "http://[::1"], ids=["empty", "unclosed-ipv6"])
def test_stats_says_when_the_metrics_option_is_no_url(url: str) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", url, "--once"])
    (line,) = str(ended.value.code).splitlines()
    assert line.startswith(f"llmrelay: --metrics (or LLMRELAY_METRICS) {url!r} is not a URL (")


@pytest.mark.parametrize(
    "body",
    [
        b"<html>\nHello world, this is no metrics endpoint\n</html>\n",
        # No line of these even looks like a sample: they showed as an idle gateway, status 0.
        b'{"object": "list", "data": [{"id": "tiny"}]}',
        b"# HELP up Another exporter.\nup 1\nprocess_cpu_seconds_total 3.5\n",
    ],
    ids=["html", "json", "another-exporter"],
)
def test_stats_says_when_the_endpoint_answers_no_metrics(body: bytes) -> None:
    """Another HTTP server's page (a port mistaken for the metrics one): one line, not a traceback."""

    with page_served(body) as url, pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", url, "--once"])
    assert ended.value.code == f"llmrelay: {url} did not answer in Prometheus's text format: is it the gateway's" + (
        " metrics_listen?"
    )


def test_the_text_format_and_quantiles() -> None:
    samples = parse_metrics(
        '# HELP x_total A.\n# TYPE x_total counter\nx_total{a="b \\"q\\"",c="d"} 3.0\nup 1\n'
        'h_bucket{le="0.1"} 5\nh_bucket{le="1.0"} 10\nh_bucket{le="+Inf"} 10\n'
    )
    assert samples[("x_total", frozenset({("a", 'b "q"'), ("c", "d")}))] == 3.0
    assert samples[("up", frozenset())] == 1.0
    buckets = {0.1: 5.0, 1.0: 10.0, float("inf"): 10.0}
    assert _quantile(0.5, buckets) == pytest.approx(0.1)
    assert _quantile(0.75, buckets) == pytest.approx(0.55)
    assert _quantile(0.99, {0.1: 0.0, float("inf"): 4.0}) == 0.1
    assert _quantile(0.5, {}) is None


def test_behind_workers_the_streams_add_up_and_a_restarted_workers_counters_count_from_zero() -> None:
    calls = 'grpc_server_handled_total{grpc_service="llmrelay.v1.LLMService",grpc_method="Complete",grpc_code="OK",'
    before = parse_metrics(
        f'{calls}worker="1"}} 100\n{calls}worker="2"}} 40\n'
        'llmrelay_open_streams{worker="1"} 1\nllmrelay_open_streams{worker="2"} 0\n'
    )
    # Worker 2 died and came back: its counter starts again from zero, at 6.
    after = parse_metrics(
        f'{calls}worker="1"}} 110\n{calls}worker="2"}} 6\n'
        'llmrelay_open_streams{worker="1"} 2\nllmrelay_open_streams{worker="2"} 4\n'
    )
    live = render_stats(after, before, seconds=2.0)
    assert row(live, "Complete")[1:3] == ["8.0", "0.0"], live  # (10 + 6) calls in 2 s, never negative
    assert re.search(r"^open streams: 6$", live, re.MULTILINE), live
    # The totals are no longer the gateway's since it started.
    restarted = parse_metrics(f'{calls}worker="1"}} 110\nllmrelay_worker_restarts_total 1\n')
    assert render_stats(restarted).startswith("llmrelay since each worker last started (1 restarted)\n")
