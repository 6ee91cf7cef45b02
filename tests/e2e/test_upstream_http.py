"""The gateway's own HTTP/1.1 client (backends/http1.py) through a real gateway and a real gRPC channel: what an
upstream does with its connections must cost the callers nothing it need not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from certs import Authority
from harness import BIN, clean_env
from llmrelay import v1 as pb
from llmrelay_server.backends import upstream_http
from raw_server import RawServer, silent
from support import (
    ANTHROPIC_TEST_KEY,
    DIALECTS,
    OPENAI_TEST_KEY,
    StubFactory,
    chat,
    read_all,
    served_by_openai,
    stream_chat,
)
from upstream import FakeUpstream

ROUNDS, CONCURRENT = 10, 20
NO_RETRIES = """
router:
  retry: {max_retries: 0}
  circuit: {failure_threshold: 1000, cooldown_s: 30}
"""


def only(upstream: FakeUpstream) -> str:
    """The upstream as the one backend; an attempt that fails is the call's failure (no retry, no fallback)."""
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{upstream.base_url}", model: {upstream.models[0]}}}
{NO_RETRIES}"""


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_an_upstream_that_closes_each_connection_after_answering_fails_no_call(
    stub_for: StubFactory, primary: FakeUpstream, streaming: bool
) -> None:
    """A server that keeps a connection for one request, and closes it right after answering without saying so
    (no Connection: close): its FIN is on the way, or already waiting unread, when the next call takes the connection
    from the pool. That connection must not be used: a request on it gets no answer (UNAVAILABLE for the caller)."""
    stub = await stub_for(only(primary))
    primary.inject(*[{"close_after": True}] * (ROUNDS * CONCURRENT))

    async def call() -> None:
        if streaming:
            assert (await read_all(stub.StreamComplete(stream_chat(), timeout=10)))[-1].finish_reason
        else:
            assert (await stub.Complete(chat(), timeout=10)).message.content

    failed: list[grpc.aio.AioRpcError] = []
    for _ in range(ROUNDS):  # each round: calls that start together, on connections the last round left
        results = await asyncio.gather(*(call() for _ in range(CONCURRENT)), return_exceptions=True)
        failed += [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
        assert not [result for result in results if isinstance(result, BaseException) and result not in failed]
    assert not failed, f"{len(failed)} of {ROUNDS * CONCURRENT} calls failed: {failed[0].details()}"
    assert len(primary.chat_requests) == ROUNDS * CONCURRENT
    assert not primary.faults


@pytest.fixture
async def hosted(tmp_path: Path) -> AsyncIterator[tuple[FakeUpstream, Path]]:
    """An upstream served over HTTPS, as a hosted API is, with a certificate from a private CA; and that CA's file."""
    authority = Authority("upstream test CA")
    context = authority.server_context(tmp_path)
    (tmp_path / "ca.pem").write_bytes(authority.cert)
    upstream = await FakeUpstream(models=("gpt-test",), host="localhost", tls=context).start()
    yield upstream, tmp_path / "ca.pem"
    await upstream.stop()


async def test_an_https_upstream_is_trusted_as_ssl_cert_file_says(
    stub_for: StubFactory, hosted: tuple[FakeUpstream, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Completions, streams and the health probe go over TLS, trusting what the SDKs' own transport would: the
    system's roots, or SSL_CERT_FILE."""
    upstream, ca_file = hosted
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    await served_by_openai(await stub_for(only(upstream)), upstream)


async def test_an_https_upstream_whose_certificate_is_not_trusted_is_unreachable(
    stub_for: StubFactory, hosted: tuple[FakeUpstream, Path], caplog: pytest.LogCaptureFixture
) -> None:
    upstream, _ = hosted
    stub = await stub_for(only(upstream))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(chat(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Why, in the HTTP client's words: what to fix (SSL_CERT_FILE) follows from it.
    where = f"https://localhost:{upstream.port}"
    reason = f"cannot reach {upstream.base_url}: cannot connect to {where}: [SSL: CERTIFICATE_VERIFY_FAILED]"
    assert reason in (caught.value.details() or ""), caught.value.details()
    assert upstream.chat_requests == []
    assert "Traceback" not in caplog.text


def _not_a_certificate(folder: Path) -> Path:
    (folder / "roots.pem").write_text("not a certificate\n")
    return folder / "roots.pem"


def _missing(folder: Path) -> Path:
    return folder / "missing.pem"


def _unhashed(folder: Path) -> Path:
    """A directory with the CA's certificate under a name of its own: OpenSSL looks one up by its subject's hash."""
    (folder / "roots").mkdir()
    (folder / "roots" / "upstream-ca.pem").write_bytes((folder / "ca.pem").read_bytes())
    return folder / "roots"


UNUSABLE_ROOTS = pytest.mark.parametrize(
    ("variable", "roots", "problem"),
    [
        ("SSL_CERT_FILE", _not_a_certificate, "no PEM certificate in it"),
        ("SSL_CERT_FILE", _missing, "No such file or directory"),
        ("SSL_CERT_DIR", _missing, "No such file or directory"),
        ("SSL_CERT_DIR", _unhashed, "no certificate in it under its subject's hash (such as 1a2b3c4d.0)"),
    ],
    ids=["file-not-pem", "file-missing", "dir-missing", "dir-not-hashed"],
)


@UNUSABLE_ROOTS
async def test_trusted_roots_that_name_no_certificates_are_said_in_the_attempts_error(
    stub_for: StubFactory,
    hosted: tuple[FakeUpstream, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    roots: Callable[[Path], Path],
    problem: str,
) -> None:
    """Read at the first connection to an https upstream (the command checks them at start): the call fails
    UNAVAILABLE naming the variable, rather than UNKNOWN with a traceback (or, for a directory, the handshake's
    "unable to get local issuer certificate", naming nothing), and the health probe at start says unreachable."""
    upstream, ca_file = hosted
    path = roots(ca_file.parent)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv(variable, str(path))
    stub = await stub_for(only(upstream))
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Complete(chat(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        said = f"cannot connect to https://localhost:{upstream.port}: {variable}: {path}: {problem}"
        assert said in (caught.value.details() or ""), caught.value.details()
    assert upstream.chat_requests == []
    assert "Traceback" not in caplog.text


@UNUSABLE_ROOTS
async def test_trusted_roots_that_name_no_certificates_stop_the_command_at_start(
    tmp_path: Path, variable: str, roots: Callable[[Path], Path], problem: str
) -> None:
    (tmp_path / "ca.pem").write_bytes(Authority("upstream test CA").cert)
    path = roots(tmp_path)
    env = clean_env(OPENAI_API_KEY=OPENAI_TEST_KEY, OPENAI_BASE_URL="https://llm.test/v1")
    env = {name: value for name, value in env.items() if not name.startswith("SSL_CERT_")} | {variable: str(path)}
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay-server", "--listen", "127.0.0.1:0",
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:  # it started: the check is missing
            process.kill()
            await process.wait()
    assert process.returncode == 1
    assert f"llmrelay-server: configuration error: {variable}: {path}: {problem}" in err.decode()
    assert "Traceback" not in err.decode()


def first_then(raw: RawServer, then: FakeUpstream) -> str:
    """A misbehaving upstream as the first backend, the fake one after it to fall back to; no retries."""
    return f"""
llm:
  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{raw.url().removesuffix("/chat/completions")}", model: m}}
  backends:
    - {{name: good, kind: vllm, base_url: "{then.base_url}", model: {then.models[0]}}}
{NO_RETRIES}"""


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_an_error_answer_in_an_encoding_the_pool_leaves_falls_back_to_the_next_backend(
    stub_for: StubFactory, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, streaming: bool
) -> None:
    # A list of codings (a proxy's "gzip, identity" over a body that is no gzip): httpx2 decoded the error's body once
    # more, by the header the pool had left, and its DecodingError ended the call INTERNAL, logged with a traceback,
    # the next backend never asked.
    asked: list[bytes] = []

    async def bad_gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append((await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1])  # its path (and health probes')
        body = b"<html>bad gateway</html>"
        head = f"HTTP/1.1 502 Bad Gateway\r\nContent-Encoding: gzip, identity\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()

    async with RawServer(bad_gateway) as raw:
        stub = await stub_for(first_then(raw, primary))
        if streaming:
            assert (await read_all(stub.StreamComplete(stream_chat(), timeout=10)))[-1].finish_reason
        else:
            assert (await stub.Complete(chat(), timeout=10)).backend == "good"
    assert asked.count(b"/v1/chat/completions") == 1 and len(primary.chat_requests) == 1
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an upstream's bad answer"


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_an_error_status_whose_body_does_not_come_is_reported_as_that_status(
    stub_for: StubFactory, monkeypatch: pytest.MonkeyPatch, streaming: bool
) -> None:
    """A 500 whose body stalls after its head, or never ends: a stream's request has no read timeout, so the call
    waited for its first chunk's timeout and reported that, not the upstream's 500 (a unary call, its read timeout)."""
    monkeypatch.setattr(upstream_http, "ERROR_BODY_WAIT_S", 0.5)

    async def stalled_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):  # until the gateway closes the connection
            writer.write(b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\n{"error": ')
            await writer.drain()

    async with RawServer(stalled_error) as raw:
        base_url = raw.url().removesuffix("/chat/completions")
        stub = await stub_for(
            f'llm:\n  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{base_url}", model: m}}\n  order: [openai]\n'
            + NO_RETRIES
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async with asyncio.timeout(5):  # first_chunk_timeout_s is 15 s
                if streaming:
                    await read_all(stub.StreamComplete(stream_chat(), timeout=30))
                else:
                    await stub.Complete(chat(), timeout=30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "HTTP 500" in (failed.value.details() or ""), failed.value.details()
        assert raw.accepted >= 1


async def test_a_connection_that_is_never_made_is_said_to_be_one(stub_for: StubFactory, primary: FakeUpstream) -> None:
    # A TLS handshake that gets no answer (or a full backlog): "the upstream did not answer in time" sent the
    # operator to a slow model, not to the network.
    async with RawServer(silent) as raw:
        base_url = raw.url("https").removesuffix("/chat/completions")
        stub = await stub_for(
            f'llm:\n  openai: {{api_key: "{OPENAI_TEST_KEY}", base_url: "{base_url}", model: m}}\n  order: [openai]\n'
            + NO_RETRIES
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Complete(chat(), timeout=30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"no connection to https://127.0.0.1:{raw.port} in 5 s" in (failed.value.details() or "")


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_an_answer_the_transport_cannot_read_is_said_to_be_one_not_an_upstream_out_of_reach(
    stub_for: StubFactory, primary: FakeUpstream, caplog: pytest.LogCaptureFixture, dialect: str
) -> None:
    # The Anthropic SDK wraps whatever its transport raises as a connection error: its probe said "cannot reach" the
    # upstream that had answered, and dropped what was wrong with the answer.
    async def encoded_as_br(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):  # until the gateway closes the connection (IncompleteReadError)
            head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: br\r\nContent-Length: 3\r\n"
            writer.write(head.encode() + b"\r\nabc")
            await writer.drain()

    said = "the answer is encoded as 'br' (Content-Encoding), which the gateway did not ask for and cannot decode"
    async with RawServer(encoded_as_br) as raw:
        key, base_url = (
            (ANTHROPIC_TEST_KEY, f"http://127.0.0.1:{raw.port}")
            if dialect == "anthropic"
            else (OPENAI_TEST_KEY, raw.url().removesuffix("/chat/completions"))
        )
        stub = await stub_for(
            f"""
llm:
  {dialect}: {{api_key: "{key}", base_url: "{base_url}", model: m}}
  backends:
    - {{name: good, kind: vllm, base_url: "{primary.base_url}", model: {primary.models[0]}}}
{NO_RETRIES}"""
        )
        report = await stub.Health(pb.HealthRequest(probe=True), timeout=10)
        [unreadable] = [backend for backend in report.backends if backend.name == dialect]
        assert not unreadable.reachable and said in unreadable.last_error, unreadable.last_error
        assert "cannot reach" not in unreadable.last_error
        assert (await stub.Complete(chat(), timeout=10)).backend == "good"
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an upstream's bad answer"
