"""`llmrelay stats` against a running gateway's metrics endpoint: the totals with --once, and the rates between two
scrapes with calls in between; across a gateway's (or a worker's) restart, and a refresh that finds no gateway."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from harness import GatewayProcess, free_port
from llmrelay import cli
from llmrelay import v1 as pb
from llmrelay.cli import _quantile, main, parse_metrics, render_stats, scrape
from support import (
    GatewayFactory,
    alive,
    call_on_new_connections,
    chat,
    children,
    http_served,
    page_served,
    start_server,
    stream_chat,
    two_backends,
    wait_until,
    worker_index,
)
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
    after = await scrape_once_counted(url, 1, "StreamComplete")  # the last call: the others are counted by then

    live = render_stats(after, before, seconds=2.0)
    assert "over the last 2.0 s" in live
    complete = row(live, "Complete")
    assert complete[1:4] == ["1.5", "0.0", "0.0"]  # 3 calls in 2 s, none failed or refused
    assert complete[4] != "-" and complete[5] != "-"  # p50, p99
    tokens = sum(a.usage.total_tokens for a in answers) + chunks[-1].usage.total_tokens
    assert row(live, "openai")[1] == f"{tokens / 2:.1f}"
    assert row(live, "StreamComplete")[1] == "0.5"

    await asyncio.to_thread(main, ["stats", "--metrics", url, "--once"])
    totals = capsys.readouterr().out
    assert "since the gateway started" in totals
    assert row(totals, "Complete")[1:4] == ["3", "0", "0"]
    assert row(totals, "openai")[1] == str(tokens)
    assert re.search(r"^open streams: 0$", totals, re.MULTILINE)


async def test_stats_tells_calls_that_failed_from_calls_refused_and_leaves_out_callers_that_left(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """An "errors" column added up every end but OK: a caller's bad request, a limit, or a caller that left (CANCELLED)
    read as the gateway failing."""
    gateway = await gateway_factory(two_backends(primary, local), server='metrics_listen: "127.0.0.1:0"')
    assert gateway.metrics is not None
    url = f"http://127.0.0.1:{gateway.metrics.port}/metrics"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb.LLMServiceStub(channel)
        await stub.Complete(chat(), timeout=5)
        for _ in range(2):  # every backend down: UNAVAILABLE
            primary.inject({"status": 503}, {"status": 503})
            local.inject({"status": 503}, {"status": 503})
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.Complete(chat(), timeout=5)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as refusal:
                await stub.Complete(pb.CompleteRequest(), timeout=5)
            assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        primary.inject({"stall_s": 10})
        asked = len(primary.chat_requests)
        left = stub.Complete(chat(), timeout=10)
        await wait_until(lambda: len(primary.chat_requests) > asked, timeout_s=5)
        left.cancel()
    async with asyncio.timeout(5):
        while True:  # the cancelled call is counted once its handler has ended
            complete = row(render_stats(await asyncio.to_thread(scrape, url)), "Complete")
            if complete[1] == "7":
                break
            await asyncio.sleep(0.05)
    assert complete[1:4] == ["7", "2", "3"]


@pytest.mark.parametrize("once", [["--once"], []], ids=["once", "live"])
def test_stats_says_when_there_is_no_endpoint(once: list[str]) -> None:
    """Live too: where the first scrape fails, the URL is likely wrong, and the view would never show anything."""
    hint = (
        re.escape("cannot read http://127.0.0.1:9/metrics: ")
        + ".+"
        + re.escape("(is the gateway's server.metrics_listen set?)")
    )
    with pytest.raises(SystemExit, match=hint):
        main(["stats", "--metrics", "http://127.0.0.1:9/metrics", *once])


def test_ctrl_c_ends_the_live_view_cleanly_but_a_snapshot_as_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    """`stats --once` cut short printed nothing and exited 0: a script took the nothing for a snapshot."""

    def interrupted(url: str) -> cli.Samples:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "scrape", interrupted)
    with pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", "http://127.0.0.1:9/metrics", "--once"])
    assert ended.value.code == 128 + signal.SIGINT
    main(["stats", "--metrics", "http://127.0.0.1:9/metrics"])  # the live view's end, as top's: no error


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_first_scrapes_error_reaches_a_terminal_with_its_control_characters_escaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An HTTP reason phrase's escape sequence (one that retitles the terminal) was written raw, where the live
    view's refreshes escaped the same error."""

    def failed(url: str) -> cli.Samples:
        raise cli.ScrapeError("cannot read http://127.0.0.1:9/metrics: HTTP 500 Bad\x1b]0;pwned\x07 thing")

    monkeypatch.setattr(cli, "scrape", failed)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", "http://127.0.0.1:9/metrics", "--once"])
    assert ended.value.code == "llmrelay: cannot read http://127.0.0.1:9/metrics: HTTP 500 Bad\\x1b]0;pwned\\x07 thing"


@pytest.mark.parametrize("url", ["http://admin:S3CRET@127.0.0.1:9/metrics", "http://admin:S3CRET@[::1/metrics"])
def test_stats_never_shows_a_password_in_the_url(url: str) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", url, "--once"])
    said = str(ended.value.code)
    assert "admin:***@" in said and "S3CRET" not in said, said


def test_stats_sends_the_urls_credentials_as_basic_authorization(capsys: pytest.CaptureFixture[str]) -> None:
    """A /metrics behind a proxy that asks for a user and password, given in the URL as Prometheus takes them: urllib
    took them for part of the host name, "Name or service not known" even for 127.0.0.1."""
    metrics = b"llmrelay_open_streams 3.0\n"
    asked: list[str | None] = []

    def guarded(handler: http.server.BaseHTTPRequestHandler) -> None:
        asked.append(handler.headers.get("Authorization"))
        allowed = handler.headers.get("Authorization") == "Basic " + base64.b64encode(b"ops:p@ss:w/rd").decode()
        handler.send_response(200 if allowed else 401)
        handler.send_header("Content-Length", str(len(metrics) if allowed else 0))
        handler.end_headers()
        if allowed:
            handler.wfile.write(metrics)

    with http_served(guarded) as url:
        authorized = url.replace("http://", "http://ops:p%40ss%3Aw%2Frd@")  # percent-encoded, as a URL writes them
        main(["stats", "--metrics", authorized, "--once"])
        with pytest.raises(SystemExit) as refused:
            main(["stats", "--metrics", url.replace("http://", "http://ops:wrong@"), "--once"])
    assert asked[0] is not None and "HTTP 401" in str(refused.value.code)
    assert "ops:***@" in str(refused.value.code) and "wrong" not in str(refused.value.code)
    assert "open streams: 3" in capsys.readouterr().out


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


def complete_calls(samples: cli.Samples, worker: str) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "grpc_server_handled_total"
        and ("grpc_method", "Complete") in labels
        and ("worker", worker) in labels
    )


async def calls(target: str, ok: int, refused: int = 0) -> None:
    """`ok` calls answered, then `refused` refused INVALID_ARGUMENT (no message): errors with no upstream's part."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb.LLMServiceStub(channel)
        for _ in range(ok):
            await stub.Complete(chat(), timeout=5)
        for _ in range(refused):
            with pytest.raises(grpc.aio.AioRpcError) as refusal:
                await stub.Complete(pb.CompleteRequest(), timeout=5)
            assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def scrape_once_counted(url: str, count: int, rpc: str = "Complete") -> cli.Samples:
    """A scrape once it counts `count` calls of `rpc` since the gateway started: a call is counted as its handler
    ends, a moment after its caller has its status (a scrape at once missed the last one, on a busy machine)."""
    async with asyncio.timeout(5):
        # Another process's counters: no event to wait on.
        while row(render_stats(samples := await asyncio.to_thread(scrape, url)), rpc)[1] != str(count):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return samples


def metrics_config(tmp_path: Path) -> tuple[Path, str]:
    port = free_port()
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: "{tmp_path / "usage.db"}", drain_s: 0, metrics_listen: "127.0.0.1:{port}"}}\n'
    )
    return config, f"http://127.0.0.1:{port}/metrics"


async def restarted(gateway: GatewayProcess, config: Path, local: FakeUpstream) -> GatewayProcess:
    """The gateway stopped, and started again on the same ports."""
    assert await gateway.stop() == 0
    again = await start_server(config, local, port=gateway.port)
    await again.wait_listening()
    await again.wait_serving()
    return again


async def test_a_gateway_restarted_between_two_scrapes_counts_from_zero(tmp_path: Path, local: FakeUpstream) -> None:
    """Its counters higher than the scrape before saw them (more calls since the restart than before it): each series'
    _created tells the new process apart, as a counter lower than before would."""
    config, url = metrics_config(tmp_path)
    gateway = await start_server(config, local)
    try:
        await gateway.wait_listening()
        await gateway.wait_serving()
        await calls(gateway.target, ok=3, refused=2)
        before = await scrape_once_counted(url, 5)
        gateway = await restarted(gateway, config, local)
        await calls(gateway.target, ok=5, refused=3)
        after = await scrape_once_counted(url, 8)
    finally:
        await gateway.stop()
    live = render_stats(after, before, seconds=4.0)
    assert row(live, "Complete")[1:4] == ["2.0", "0.0", "0.8"], live  # 8 calls in 4 s, 3 refused: not 3 and 1


async def test_behind_workers_one_not_answering_is_said_and_its_restart_counts_from_zero(
    tmp_path: Path, local: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker killed: its calls are missing from --once's totals until it is back, which the title says; back, its
    counters start from zero, and the supervisor's start time for it tells so however high they have grown again."""
    config, url = metrics_config(tmp_path)
    gateway = await start_server(config, local, "--workers", "2")
    try:
        await gateway.wait_listening()
        await gateway.wait_for_line("(2 workers)")
        async with asyncio.timeout(60):
            while True:  # both workers have answered calls: worker 1's counter starts above zero
                before = await asyncio.to_thread(scrape, url)
                if complete_calls(before, "1") and complete_calls(before, "2"):
                    break
                await call_on_new_connections(gateway.target, 4)
            [killed] = [pid for pid in children(gateway.process.pid) if worker_index(pid) == 1]
            os.kill(killed, signal.SIGKILL)
            while alive(killed):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await asyncio.to_thread(main, ["stats", "--metrics", url, "--once"])
            title = capsys.readouterr().out.splitlines()[0]
            assert title == "llmrelay since the gateway started (worker 1 not answering)", title

            made = 0  # every call from here on is counted after `before`
            while complete_calls(after := await asyncio.to_thread(scrape, url), "1") < complete_calls(before, "1"):
                await call_on_new_connections(gateway.target, 4)
                made += 4
                await asyncio.sleep(0.1)
        await asyncio.to_thread(main, ["stats", "--metrics", url, "--once"])
        assert capsys.readouterr().out.startswith("llmrelay since each worker last started (1 restarted)\n")
    finally:
        await gateway.stop()
    live = render_stats(after, before, seconds=1.0)
    assert row(live, "Complete")[1] == f"{made:.1f}", (made, live)
    assert live.startswith("llmrelay over the last 1.0 s\n")


async def test_live_stats_says_the_gateway_is_unreachable_and_goes_on(tmp_path: Path, local: FakeUpstream) -> None:
    """A refresh that finds no gateway (restarting, say) is one line, and the next refreshes try again."""
    config, url = metrics_config(tmp_path)
    gateway = await start_server(config, local)
    view = None
    try:
        await gateway.wait_listening()
        await gateway.wait_serving()
        view = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmrelay.cli", "stats", "--metrics", url, "--interval", "0.3",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

        async def line_starting(text: str) -> str:
            assert view is not None and view.stdout is not None
            async with asyncio.timeout(30):
                while line := (await view.stdout.readline()).decode():
                    if line.startswith(text):
                        return line
            raise AssertionError(f"the view ended (status {await view.wait()}) before a line {text!r}")

        await line_starting("llmrelay over the last")
        assert await gateway.stop() == 0
        down = await line_starting("llmrelay: ")
        assert re.fullmatch(rf"llmrelay: \d\d:\d\d:\d\d cannot read {url}: .+; trying again every 0.3 s\n", down), down
        gateway = await start_server(config, local, port=gateway.port)
        await gateway.wait_listening()
        await line_starting("llmrelay over the last")
        assert view.returncode is None
    finally:
        if view is not None and view.returncode is None:
            view.terminate()
            await view.wait()
        await gateway.stop()


def endless(handler: http.server.BaseHTTPRequestHandler) -> None:
    """An answer that goes on (4 MiB here, and then ends, so that a test of a scrape that has no bound ends too)."""
    handler.send_response(200)
    handler.end_headers()
    for _ in range(64):
        handler.wfile.write(b"llmrelay_open_streams 0\n" * 2730)
    handler.close_connection = True


def trickled(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A sample every 0.1 s, for 4 s: each read gets something well within its timeout."""
    handler.send_response(200)
    handler.end_headers()
    for _ in range(40):
        handler.wfile.write(b"llmrelay_open_streams 0\n")
        handler.wfile.flush()
        time.sleep(0.1)
    handler.close_connection = True


def redirect_loop(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(302)
    handler.send_header("Location", "/metrics")
    handler.send_header("Content-Length", "0")
    handler.end_headers()


@pytest.mark.parametrize(
    ("write", "said"),
    [
        (endless, "{url} answered more than 1 MiB: is it the gateway's metrics_listen?"),
        (trickled, "cannot read {url}: no whole answer within 1 s"),
        (redirect_loop, "cannot read {url}: HTTP 302 The HTTP server returned a redirect error that would lead to an"),
    ],
    ids=["endless", "trickled", "redirect-loop"],
)
def test_a_scrape_is_bounded_in_size_and_time_and_said_in_one_line(
    write: Callable[[http.server.BaseHTTPRequestHandler], None], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "MAX_SCRAPE_BYTES", 2**20, raising=False)
    monkeypatch.setattr(cli, "SCRAPE_DEADLINE_S", 1.0, raising=False)
    with http_served(write) as url, pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", url, "--once"])
    (line,) = str(ended.value.code).splitlines()
    assert line.startswith("llmrelay: " + said.format(url=url)), line


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("127.0.0.1:9464/metrics", "is not a URL (no scheme): add http://, e.g. http://127.0.0.1:9464/metrics"),
        ("localhost:9464/metrics", "is not a URL (no scheme): add http://, e.g. http://127.0.0.1:9464/metrics"),
        ("file:///etc/hostname", "is not an http:// or https:// URL; e.g. http://127.0.0.1:9464/metrics"),
    ],
    ids=["address", "host", "file"],
)
def test_stats_says_to_add_http_to_a_url_without_it(url: str, said: str) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["stats", "--metrics", url, "--once"])
    assert ended.value.code == f"llmrelay: --metrics (or LLMRELAY_METRICS) {url!r} {said}"
