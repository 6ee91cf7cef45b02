"""Upstream calls through a forward proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), through a real gateway and a real gRPC
channel, as a company network makes a gateway reach a hosted API: the proxy (tests/proxy.py) sees a tunnel to the
upstream's name and port, and nothing of the calls; its credentials are never shown."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from certs import Authority
from harness import BIN, clean_env
from proxy import ForwardProxy
from raw_server import RawServer
from support import OPENAI_TEST_KEY, StubFactory, chat, served_by_openai
from upstream import FakeUpstream

NAME = "api.upstream.test"
"""The hosted API's name: not loopback (loopback is never proxied); the test proxy reaches it at 127.0.0.1."""
PASSWORD = "pr0xy-s3cret"


def hosted_by_name(upstream: FakeUpstream, scheme: str) -> str:
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{scheme}://{NAME}:{upstream.port}/v1", model: gpt-test}}
router:
  retry: {{max_retries: 0}}
"""


@pytest.fixture
async def hosted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeUpstream]:
    """An upstream over HTTPS under NAME, its certificate from a private CA that SSL_CERT_FILE names."""
    authority = Authority("proxied upstream CA")
    context = authority.server_context(tmp_path, NAME)
    (tmp_path / "ca.pem").write_bytes(authority.cert)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    upstream = await FakeUpstream(models=("gpt-test",), tls=context).start()
    yield upstream
    await upstream.stop()


async def test_a_hosted_api_through_the_proxy_in_https_proxy(
    stub_for: StubFactory, hosted: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with ForwardProxy(credentials=f"gateway:{PASSWORD}") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url(f"gateway:{PASSWORD}"))
        await served_by_openai(await stub_for(hosted_by_name(hosted, "https")), hosted)  # the Health probe too
        assert set(proxy.asked) == {f"CONNECT {NAME}:{hosted.port}"}  # tunnels only: the calls are TLS inside
        assert len(proxy.asked) < 6  # kept alive and reused
    assert PASSWORD not in caplog.text


async def test_an_http_upstream_through_the_proxy_in_http_proxy(
    stub_for: StubFactory, primary: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ForwardProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url())
        stub = await stub_for(hosted_by_name(primary, "http"))
        assert (await stub.Complete(chat(), timeout=5)).message.content == "echo: hello gateway"
        assert f"POST http://{NAME}:{primary.port}/v1/chat/completions" in proxy.asked
        assert primary.chat_headers[-1]["host"] == f"{NAME}:{primary.port}"


async def test_no_proxy_and_loopback_go_directly(
    stub_for: StubFactory, primary: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        monkeypatch.setenv("NO_PROXY", "upstream.test")
        # NO_PROXY names NAME's domain: straight there, where nothing answers for that name.
        stub = await stub_for(hosted_by_name(primary, "http"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "proxy" not in (caught.value.details() or "")
        # The upstream by its loopback address: never through the proxy.
        loopback = await stub_for(hosted_by_name(primary, "http").replace(NAME, "127.0.0.1"))
        assert (await loopback.Complete(chat(), timeout=5)).message.content == "echo: hello gateway"
        assert proxy.asked == []


async def test_a_proxy_out_of_reach_or_refusing_says_so_to_the_caller(
    stub_for: StubFactory, hosted: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with ForwardProxy(credentials="gateway:right") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url(f"gateway:{PASSWORD}"))
        stub = await stub_for(hosted_by_name(hosted, "https"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat(), timeout=5)
        port = proxy.port
    with pytest.raises(grpc.aio.AioRpcError) as unreachable:
        await stub.Complete(chat(), timeout=5)  # the proxy is gone now
    for caught, says in (
        (
            refused,
            f"the proxy http://127.0.0.1:{port} (HTTPS_PROXY) refused a tunnel to {NAME}:{hosted.port}: 407 Proxy"
            " Authentication Required (it refused the credentials in HTTPS_PROXY's URL: check them",
        ),
        (unreachable, f"cannot connect to the proxy http://127.0.0.1:{port} (HTTPS_PROXY)"),
    ):
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"cannot reach https://{NAME}:{hosted.port}/v1: {says}" in (caught.value.details() or "")
        assert PASSWORD not in (caught.value.details() or "")
    assert hosted.chat_requests == []
    assert PASSWORD not in caplog.text and "Traceback" not in caplog.text


async def test_a_proxys_error_page_that_quotes_its_credentials_passes_them_on_to_no_one(
    stub_for: StubFactory, primary: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy refusing a request with a page that quotes its headers (as debugging and error pages do): the caller's
    status passed on the Basic credentials, where the backend's own key in the same page was redacted."""
    token = base64.b64encode(f"gateway:{PASSWORD}".encode()).decode()

    async def quoting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        quoted = [line for line in head.split("\r\n") if line.lower().startswith(("proxy-authorization", "authoriz"))]
        body = ("Denied by policy: " + "; ".join(quoted)).encode("latin-1")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    async with RawServer(quoting) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://gateway:{PASSWORD}@127.0.0.1:{proxy.port}")
        stub = await stub_for(hosted_by_name(primary, "http"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(chat(), timeout=5)
    details = refused.value.details() or ""
    assert "Denied by policy: " in details and "Proxy-Authorization: Basic [redacted]" in details, details
    assert "authorization: Bearer [redacted]" in details  # the backend's key, as before
    assert token not in details and PASSWORD not in details
    assert token not in caplog.text and PASSWORD not in caplog.text


@pytest.mark.parametrize("value", ["socks5://gateway:pr0xy-s3cret@proxy.corp:1080", "https://proxy.corp"])
async def test_a_proxy_the_gateway_cannot_go_through_stops_it_at_start(value: str) -> None:
    """Calls must not go around a proxy the environment names: a gateway that could not use it does not start."""
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", "--listen", "127.0.0.1:0",
        env=clean_env(HTTPS_PROXY=value), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 20)
    said = err.decode()
    assert process.returncode == 1
    assert f"configuration error: HTTPS_PROXY: {value.split('://')[0]}://proxy.corp... is not an http:// proxy" in said
    assert PASSWORD not in said and "Traceback" not in said
