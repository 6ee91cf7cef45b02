"""A loopback forward proxy, as a company network puts between a gateway and the internet: a tunnel (CONNECT) for an
https upstream, the proxy's own request for an http one (absolute-form). Every upstream name is reached at
127.0.0.1 here, so that a test can name an upstream that is not loopback (a loopback upstream is never proxied).
It records what it was asked, and asks for Basic credentials when given some."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import urllib.parse

from raw_server import RawServer


class ForwardProxy:
    def __init__(self, credentials: str | None = None) -> None:
        self._wanted = f"Basic {base64.b64encode(credentials.encode()).decode()}" if credentials else None
        self.asked: list[str] = []
        """Each request's method and target, as it came: "CONNECT upstream.test:443", "POST http://..."."""
        self.authorizations: list[str | None] = []
        """Each request's Proxy-Authorization header, or None."""
        self.forwarded_heads: list[bytes] = []
        """The heads of the requests it sent on (absolute-form ones, made origin-form)."""
        self._server = RawServer(self._relay)

    async def __aenter__(self) -> ForwardProxy:
        await self._server.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._server.__aexit__(*exc_info)

    @property
    def port(self) -> int:
        return self._server.port

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}{'@' if credentials else ''}127.0.0.1:{self.port}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, headers = _parsed(head)
        if not self._admits(method, target, headers):
            writer.write(
                b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test"\r\n'
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            return
        port = int(target.rsplit(":", 1)[1]) if method == "CONNECT" else urllib.parse.urlsplit(target).port or 80
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            else:
                await asyncio.gather(self._requests(head, reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            upstream_writer.close()

    def _admits(self, method: str, target: str, headers: list[str]) -> bool:
        """Records the request; whether its credentials are the ones wanted."""
        authorization = next(
            (line.split(":", 1)[1].strip() for line in headers if line.lower().startswith("proxy-authorization:")),
            None,
        )
        self.asked.append(f"{method} {target}")
        self.authorizations.append(authorization)
        return self._wanted is None or authorization == self._wanted

    async def _requests(self, head: bytes, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        """Each absolute-form request of a kept-alive connection, sent on in origin-form without the proxy's
        credentials (the first one's head already read and admitted)."""
        while True:
            method, target, headers = _parsed(head)
            url = urllib.parse.urlsplit(target)
            path = url.path + (f"?{url.query}" if url.query else "")
            kept = [line for line in headers if not line.lower().startswith("proxy-authorization:")]
            forwarded = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "", ""]).encode("latin-1")
            self.forwarded_heads.append(forwarded)
            length = next(
                (int(line.split(":", 1)[1]) for line in kept if line.lower().startswith("content-length:")), 0
            )
            upstream.write(forwarded + await reader.readexactly(length))
            await upstream.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            if not self._admits(*_parsed(head)):
                break
        upstream.close()


def _parsed(head: bytes) -> tuple[str, str, list[str]]:
    """A request head's method, target and header lines."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    return method, target, [line for line in lines if line]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
