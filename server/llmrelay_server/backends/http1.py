"""A small HTTP/1.1 keep-alive client for the gateway's hot path: POST a JSON body, read the answer whole or as it
arrives, over a pool of connections per backend.

Why it exists: measured with callgrind, aiohttp's ClientSession request and response path costs about 360k of the
gateway's 1,375k instructions per unary call (issue 17); an asyncio.Protocol with httptools (llhttp, the parser
uvicorn uses) sending the same POST costs about 20k. Everything that does not change between a backend's requests
(request line, Host, the SDK's and the backend's headers) is encoded once (`Http1Target`); a request is one
transport.write, the answer is parsed in C, and the body is handed over as the bytes that arrived.

Through a forward proxy (`proxies`: HTTP_PROXY, HTTPS_PROXY, NO_PROXY) when the environment names one: an https
upstream in a tunnel the proxy opens (CONNECT), an http one by the proxy's own request (absolute-form).

What it does not do, because the gateway's upstream calls need none of it: no redirects (an upstream that answers
3xx gets that answer back, as `allow_redirects=False` does today), no cookies (aiohttp's session keeps
a cookie jar; nothing here stores or sends one), no HTTP/2, no Expect: 100-continue, no request streaming, no
decoding but gzip and deflate (it never sends Accept-Encoding, and decodes those two if an upstream uses them anyway).

Failures come out as httpx2's exceptions, as the SDKs' aiohttp transport reports aiohttp's, so that
upstream_http's mapping to the SDK's errors applies unchanged:

    nothing listening, unreachable, TLS refused   httpx2.ConnectError
    the proxy unreachable, or refusing a tunnel   httpx2.ProxyError
    connecting took longer than the connect timeout  httpx2.ConnectTimeout
    no connection free within the connect timeout  httpx2.PoolTimeout
    no file left to open one (EMFILE, ENFILE)      OutOfFiles, a PoolTimeout: the gateway's bound, not the upstream's
    no byte of the answer within the read timeout  httpx2.ReadTimeout
    closed before any byte of the answer           httpx2.RemoteProtocolError (the SDK's connection error)
    closed or reset in the middle of the answer    httpx2.ReadError
    not HTTP (status line or one < 100, header,    wire.MalformedAnswerError("not an HTTP answer: ...")
      chunk, 101)
    a status line and headers over MAX_HEAD        wire.MalformedAnswerError
    trailers (or what follows a body's last piece  wire.MalformedAnswerError
      before its end) over MAX_HEAD
    a gzip or deflate body that does not inflate   wire.MalformedAnswerError
    a body in another Content-Encoding (br, zstd)  wire.MalformedAnswerError
    a body over its reader's bound (once           wire.MalformedAnswerError
      decompressed)
    no whole answer within the read timeout        httpx2.ReadTimeout
      (Http1Transport's requests alone)
    the pool closed (aclose) under a request       httpx2.ConnectError (waiting) or httpx2.ReadError (reading)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import select
import ssl
import urllib.parse
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final, TypeVar, cast

import httptools
import httpx2

from llmrelay_server.backends.proxies import NO_PROXIES, Proxies, Proxy
from llmrelay_server.backends.wire import MalformedAnswerError

CONNECT_TIMEOUT_S: Final = 5.0
"""The longest a new connection may take, and the longest a request waits for a free one (upstream_http's value:
a call's connect timeout is min(CONNECT_TIMEOUT_S, its timeout))."""
HIGH_WATER: Final = 64 * 1024
"""Unread answer bytes beyond which a connection stops reading from its socket until they are taken."""
MAX_HEAD: Final = 64 * 1024
"""The most an answer's status line and headers may take (aiohttp allowed 8 KiB a line): beyond it, the answer is
malformed, rather than held in memory for as long as a broken upstream goes on sending headers."""
INFLATED_PIECE: Final = 256 * 1024
"""The most one piece of a compressed answer read piece by piece is inflated to at a time (a few KiB can inflate to
gigabytes): what a read inflates to beyond it comes as the next pieces, each inflated when it is taken. A whole body
has the bound its reader gives (`Http1Response.read`)."""
_SLACK_S: Final = 0.005
"""Timers fire up to this early (uvloop's clock moves in milliseconds); a deadline this close counts as reached."""
_OURS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "accept-encoding",
        "keep-alive",
        "proxy-authorization",
    }
)
"""Headers the client writes itself, or leaves out: a target's headers that name them are dropped."""


class OutOfFiles(httpx2.PoolTimeout):
    """The process may open no more files (its `ulimit -n`, or the system's): no connection could be made, through no
    fault of the upstream's."""


def _out_of_files(error: OSError) -> OutOfFiles | None:
    """`error` as the gateway's own limit on open files reached, not the upstream's (or a proxy's) failure; None for
    any other."""
    if error.errno not in (errno.EMFILE, errno.ENFILE):
        return None
    return OutOfFiles(f"{error.strerror}: raise the gateway's open files limit (ulimit -n)")


class TrustConfigError(ValueError):
    """SSL_CERT_FILE or SSL_CERT_DIR names certificates that cannot be read: no https upstream could be checked."""


_TRUST_VARIABLE_SAYS: Final = (
    "it names the CA certificates https upstreams are checked against (unset it for the system's)"
)
_HASHED_NAME: Final = re.compile(r"[0-9a-f]{8}\.[0-9]+", re.IGNORECASE)
"""How OpenSSL finds a certificate in a directory: by its subject's hash (`openssl rehash` makes the names)."""


def upstream_tls_context() -> ssl.SSLContext:
    """What https upstreams' certificates are checked against: the certificates the SDKs trust (SSL_CERT_FILE or
    SSL_CERT_DIR when set, the system's otherwise); TrustConfigError naming the variable when they cannot be read."""
    if not os.environ.get("SSL_CERT_FILE") and (directory := os.environ.get("SSL_CERT_DIR")):
        _check_certificate_directory(directory)
    try:
        return httpx2.create_ssl_context()
    except OSError as exc:  # ssl.SSLError too: a file with no PEM certificate in it
        variable = "SSL_CERT_FILE" if os.environ.get("SSL_CERT_FILE") else "SSL_CERT_DIR"
        problem = exc.strerror if not isinstance(exc, ssl.SSLError) else "no PEM certificate in it"
        raise TrustConfigError(
            f"{variable}: {os.environ.get(variable, '')}: {problem}; {_TRUST_VARIABLE_SAYS}"
        ) from None


def _check_certificate_directory(directories: str) -> None:
    """OpenSSL reads a directory's certificates only as a handshake looks for an issuer, by the hash of its name: a
    directory missing, or holding none under such names (`openssl rehash` never run), was taken without a word, and
    every https upstream's handshake failed "unable to get local issuer certificate", naming no variable. The variable
    is a list, as OpenSSL reads it (`/etc/ssl/certs:/opt/corp/certs`): one of its folders holding some will do."""
    problems = []
    for directory in filter(None, directories.split(os.pathsep)):
        try:
            names = os.listdir(directory)
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror}")
            continue
        if any(_HASHED_NAME.fullmatch(name) for name in names):
            return
        problems.append(
            f"{directory}: no certificate in it under its subject's hash (such as 1a2b3c4d.0), the only names OpenSSL"
            f" looks for: run `openssl rehash {directory}`"
        )
    said = "; ".join(problems) if len(problems) != 1 else problems[0].partition(": ")[2]
    raise TrustConfigError(f"SSL_CERT_DIR: {directories}: {said or 'no folder in it'}; {_TRUST_VARIABLE_SAYS}")


Origin = tuple[str, str, int]
"""(scheme, host, port): the connections one target's requests share."""
RawHeaders = list[tuple[bytes, bytes]]


class Http1Target:
    """One URL that requests go to, with everything that does not change between them encoded once: the request
    line, Host and `headers` (Host, Content-Length, Transfer-Encoding, Connection, Keep-Alive, Accept-Encoding and
    Proxy-Authorization among them are dropped: the client writes its own or none); through `proxy` when given
    (`Http1Pool.target` finds it)."""

    __slots__ = ("_names", "_pairs", "head", "host", "origin", "proxy", "ssl", "url")

    def __init__(
        self, url: str, headers: Mapping[str, str] | None = None, *, method: str = "POST", proxy: Proxy | None = None
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http or https URL: {url!r}")
        self.url = url
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.proxy = proxy
        port = parts.port or (443 if self.ssl else 80)
        self.origin: Origin = (parts.scheme, self.host, port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and port != (443 if self.ssl else 80):
            host = f"{host}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._pairs = [(name, value) for name, value in (headers or {}).items() if name.lower() not in _OURS]
        if proxy is not None and not self.ssl:
            # To a proxy, an http request names its whole URL (absolute-form), and carries the proxy's credentials.
            target = f"http://{host}{target}"
            if proxy.authorization is not None:
                self._pairs.append(("Proxy-Authorization", proxy.authorization))
        self._names = frozenset(name.lower() for name, _ in self._pairs)
        self.head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode() + _header_lines(self._pairs)
        """The request line, Host and the fixed headers, each line ended: the head less Content-Length."""

    def request(self, content: bytes, extra: Mapping[str, str] | None = None) -> bytes:
        """The whole request: the head, `extra` headers (which replace a fixed one of the same name), the length and
        `content`."""
        head = self.head
        if extra:
            pairs = [(name, value) for name, value in extra.items() if name.lower() not in _OURS]
            replaced = {name.lower() for name, _ in pairs}
            if not self._names.isdisjoint(replaced):  # rare: the head again, less the headers replaced
                request_line, host, _ = self.head.split(b"\r\n", 2)
                kept = [(name, value) for name, value in self._pairs if name.lower() not in replaced]
                head = request_line + b"\r\n" + host + b"\r\n" + _header_lines(kept)
            head += _header_lines(pairs)
        return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(content), content)


def _header_lines(pairs: list[tuple[str, str]]) -> bytes:
    for name, value in pairs:
        if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
            # The value is not shown: it may be a key.
            raise ValueError(f"header {name!r}: a line break in its name or value, or a colon in its name")
    return "".join(f"{name}: {value}\r\n" for name, value in pairs).encode()


class Http1Pool:
    """One backend's connections, by origin: at most `limits.max_connections` open (a request beyond waits, first
    come first served, for at most the connect timeout: httpx2.PoolTimeout), at most
    `limits.max_keepalive_connections` of them idle (one coming back beyond that is closed), each idle one closed
    after `limits.keepalive_expiry` (one timer for the pool while any are idle). An idle connection that its server
    closes is dropped at once and never handed out. Made anywhere; used inside one running loop."""

    __slots__ = (
        "_closed",
        "_conns",
        "_expiry",
        "_idle",
        "_idle_count",
        "_loop",
        "_max_idle",
        "_max_open",
        "_open",
        "_proxies",
        "_ssl",
        "_sweep",
        "_waiters",
    )

    def __init__(
        self, limits: httpx2.Limits, ssl_context: ssl.SSLContext | None = None, proxies: Proxies = NO_PROXIES
    ) -> None:
        self._proxies = proxies
        self._max_open = limits.max_connections
        self._max_idle = limits.max_keepalive_connections
        self._expiry = limits.keepalive_expiry
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[Origin, deque[_Connection]] = {}
        """Idle connections by origin, the one that came back last on the right (taken first)."""
        self._idle_count = 0
        self._open = 0
        """Connections open or being opened, and slots handed to waiters that are about to open one."""
        self._conns: set[_Connection] = set()
        self._waiters: deque[_Waiter] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def target(self, url: str, headers: Mapping[str, str] | None = None, *, method: str = "POST") -> Http1Target:
        """`url` as a target of this pool's requests: through the proxy the pool's `proxies` name for it, if any."""
        return Http1Target(url, headers, method=method, proxy=self._proxies.for_url(url))

    @property
    def connections(self) -> int:
        """Connections open or being opened."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return self._idle_count

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection."""
        return len(self._waiters)

    @property
    def all_in_use(self) -> bool:
        """Whether every connection the pool may open is made and serving a request: one more waits for a turn.
        Not while some are still being made (an upstream that takes no connection holds their slots too)."""
        return self._max_open is not None and len(self._conns) - self._idle_count >= self._max_open

    async def post(
        self,
        target: Http1Target,
        content: bytes,
        timeout_s: float | None,
        extra_headers: Mapping[str, str] | None = None,
        sent: Callable[[], None] | None = None,
        begun: Callable[[], None] | None = None,
    ) -> Http1Response:
        """Sends `content` to `target` and returns the answer with its status and headers read; its body is the
        caller's to read (`read`, or `async for piece in response`) or to `close`, which the caller must do
        (read to its end, the connection goes back to the pool by itself). `timeout_s` bounds the wait for each piece
        of the answer (None: no bound); connecting and waiting for a free connection take at most
        min(CONNECT_TIMEOUT_S, timeout_s) each. `begun` is called once the request has a connection or a slot to open
        one: before, it waited in line behind the pool's bound, the upstream not even connected to. `sent` is called
        once the request is written to a connection: before, the server had none of it."""
        request = target.request(content, extra_headers)
        while True:
            conn = self._take_idle(target.origin)
            if conn is None:
                conn = await self._connect(target, timeout_s, begun)
            elif begun is not None:
                begun()
            if not conn.lost and not (conn.served and conn.stale()):
                break
            # Closed by its server (or sent bytes nobody asked for) before it could be used: one that answered and
            # closed at once, without saying so, has its FIN waiting unseen by the loop yet (stale()).
            self._release(conn, reuse=False)
        try:
            conn.send(request, timeout_s)
            if sent is not None:
                sent()
            await conn.head()
        except BaseException:
            self._release(conn, reuse=False)
            raise
        response = Http1Response(self, conn)
        if response.status == 407 and target.proxy is not None and not target.ssl:
            # The forward proxy's answer, not the upstream's: said as a tunnel's 407 is (_through), not counted
            # against the backend as its own error.
            response.close()
            raise httpx2.ProxyError(
                f"the proxy {target.proxy} refused the request to {_where(target)}: 407 {response.reason}"
                + _credentials_refused(target.proxy)
            )
        return response

    async def aclose(self) -> None:
        """Closes every connection, idle or in use (their readers get httpx2.ReadError), and fails the requests
        waiting for one (httpx2.ConnectError); a request after this fails the same way."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(httpx2.ConnectError("the connection pool is closed"))
        for idle in self._idle.values():
            for conn in idle:
                conn.idle = False
                conn.close()
                self._free(conn)
        self._idle.clear()
        self._idle_count = 0
        for conn in list(self._conns):
            conn.close()
        await asyncio.sleep(0)  # the transports' connection_lost

    # --- connections in and out ------------------------------------------------------------------------------

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            conn.idle = False
            conn.busy = True
            if conn.lost or (self._expiry is not None and now - conn.idle_since >= self._expiry):
                conn.close()
                self._free(conn)
                continue
            return conn
        return None

    async def _connect(
        self, target: Http1Target, timeout_s: float | None, begun: Callable[[], None] | None
    ) -> _Connection:
        """A connection to `target`'s origin: one handed over by a request that finished while this one waited, or
        a new one on a slot of the pool's; `begun` called once it has either."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._closed:
            raise httpx2.ConnectError("the connection pool is closed")
        connect_s = CONNECT_TIMEOUT_S if timeout_s is None else min(CONNECT_TIMEOUT_S, timeout_s)
        handed: _Connection | None = None
        if self._max_open is None or self._open < self._max_open:
            self._open += 1
        elif not self._evict_idle():
            handed = await self._wait_turn(target.origin, connect_s, loop)
        if begun is not None:
            begun()
        if handed is not None:
            return handed
        # This request holds a slot (counted in _open) until it has a connection, or gives the slot back.
        try:
            if target.ssl and self._ssl is None:
                self._ssl = upstream_tls_context()
            async with asyncio.timeout(connect_s):
                if target.proxy is None:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self, loop, target.origin),
                        target.host,
                        target.origin[2],
                        ssl=self._ssl if target.ssl else None,
                        server_hostname=target.host if target.ssl else None,
                    )
                else:
                    conn = await self._through(target.proxy, target, loop)
        except TrustConfigError as exc:
            self._free_slot()
            raise httpx2.ConnectError(f"cannot connect to {_where(target)}: {exc}") from None
        except TimeoutError as exc:
            self._free_slot()
            via = f" through the proxy {target.proxy}" if target.proxy is not None else ""
            raise httpx2.ConnectTimeout(f"no connection to {_where(target)}{via} in {connect_s:g} s") from exc
        except OSError as exc:  # refused, unreachable, a name not found, a certificate refused (ssl.SSLError)
            self._free_slot()
            if (out := _out_of_files(exc)) is not None:
                raise out from exc
            via = f" through the proxy {target.proxy}" if target.proxy is not None else ""
            # A connection reset as TLS began (by the upstream, or the proxy's tunnel to it) has no words of its own.
            why = str(exc) or (
                "the connection closed as it was being made" + (" (its TLS handshake)" if target.ssl else "")
            )
            raise httpx2.ConnectError(f"cannot connect to {_where(target)}{via}: {why}") from exc
        except BaseException:
            self._free_slot()
            raise
        conn.slot = True
        conn.busy = True
        self._conns.add(conn)
        if self._closed:  # closed while connecting
            self._release(conn, reuse=False)
            raise httpx2.ConnectError("the connection pool is closed")
        return conn

    async def _through(self, proxy: Proxy, target: Http1Target, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A connection to `target` through `proxy`: to the proxy itself for an http upstream (the requests name
        their URLs); for an https one, a tunnel the proxy opens to it (CONNECT), then TLS with the upstream inside."""
        try:
            if not target.ssl:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop, target.origin), proxy.host, proxy.port
                )
                return conn
            transport, tunnel = await loop.create_connection(lambda: _Tunnel(loop), proxy.host, proxy.port)
        except OSError as exc:
            if (out := _out_of_files(exc)) is not None:
                raise out from exc
            raise httpx2.ProxyError(f"cannot connect to the proxy {proxy} for {_where(target)}: {exc}") from exc
        try:
            host, port = target.origin[1], target.origin[2]
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            credentials = f"Proxy-Authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
            transport.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{credentials}\r\n".encode())
            status, reason = await tunnel.answer
            if not 200 <= status < 300:
                raise httpx2.ProxyError(
                    f"the proxy {proxy} refused a tunnel to {authority}: {status} {reason}"
                    + (_credentials_refused(proxy) if status == 407 else "")
                )
            conn = _Connection(self, loop, target.origin)
            assert self._ssl is not None  # _connect made it for an https target
            tls = await loop.start_tls(transport, conn, self._ssl, server_hostname=host)
            if tls is None:  # the transport closed as TLS began
                raise httpx2.ProxyError(f"the tunnel through the proxy {proxy} closed before TLS began")
            conn.connection_made(tls)
            return conn
        except BaseException:
            transport.close()
            raise

    async def _wait_turn(self, origin: Origin, connect_s: float, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """Waits in line for a connection of `origin` that another request leaves (returned) or a slot to open one
        (None), for at most `connect_s`."""
        waiter = _Waiter(origin, loop.create_future())
        self._waiters.append(waiter)
        timer = loop.call_later(connect_s, _expire, waiter.future, connect_s, self._max_open)
        try:
            return await waiter.future
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Handed something, but cancelled before it could take it: hand it on.
                if (handed := future.result()) is not None:
                    self._release(handed, reuse=True)
                else:
                    self._free_slot()
            else:  # timed out or cancelled while still in line
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        finally:
            timer.cancel()

    def _evict_idle(self) -> bool:
        """At the limit with none idle for the origin asked for: closes the idle connection of another origin that
        has waited longest, and keeps its slot for the caller; False when none is idle."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.origin].popleft()
        self._idle_count -= 1
        oldest.idle = False
        oldest.slot = False  # its slot is the caller's now
        self._conns.discard(oldest)
        oldest.close()
        return True

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        """A request is done with `conn`: back to the pool when `reuse` and it can be reused, else closed."""
        conn.busy = conn.sent = False
        if not reuse or conn.lost or self._closed:
            conn.close()
            self._free(conn)
            return
        # First come, first served: a request waiting gets this connection, or its slot when it wants another origin.
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.future.done():
                continue
            if waiter.origin == conn.origin:
                conn.busy = True
                waiter.future.set_result(conn)
            else:
                conn.close()
                conn.slot = False
                self._conns.discard(conn)
                waiter.future.set_result(None)
            return
        if self._max_idle is not None and self._idle_count >= self._max_idle:
            conn.close()
            self._free(conn)
            return
        loop = self._loop
        assert loop is not None
        conn.idle_since = loop.time()
        conn.idle = True
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = deque()
        idle.append(conn)
        self._idle_count += 1
        if self._sweep is None and self._expiry is not None:
            self._sweep = loop.call_at(conn.idle_since + self._expiry, self._on_sweep)

    def _lost_idle(self, conn: _Connection) -> None:
        """An idle connection's server closed it (or it ended otherwise): out of the pool."""
        if conn.idle:
            conn.idle = False
            self._idle[conn.origin].remove(conn)
            self._idle_count -= 1
            self._free(conn)

    def _free(self, conn: _Connection) -> None:
        """`conn` is closed: its slot goes to the first request waiting, or back to the pool."""
        self._conns.discard(conn)
        if conn.slot:
            conn.slot = False
            self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot is the waiter's: _open stays as it is
                return
        self._open -= 1

    def _on_sweep(self) -> None:
        """Closes the idle connections past keepalive_expiry; runs again when the next one will be."""
        self._sweep = None
        loop, expiry = self._loop, self._expiry
        assert loop is not None and expiry is not None
        now = loop.time() + _SLACK_S
        next_at: float | None = None
        for idle in self._idle.values():
            while idle and idle[0].idle_since + expiry <= now:
                conn = idle.popleft()
                conn.idle = False
                self._idle_count -= 1
                conn.close()
                self._free(conn)
            if idle and (next_at is None or idle[0].idle_since < next_at):
                next_at = idle[0].idle_since
        if next_at is not None:
            self._sweep = loop.call_at(next_at + expiry, self._on_sweep)


class _Waiter:
    __slots__ = ("future", "origin")

    def __init__(self, origin: Origin, future: asyncio.Future[_Connection | None]) -> None:
        self.origin, self.future = origin, future


def _expire(future: asyncio.Future[_Connection | None], seconds: float, limit: int | None) -> None:
    if not future.done():
        future.set_exception(httpx2.PoolTimeout(f"no connection free in {seconds:g} s ({limit} open)"))


def _credentials_refused(proxy: Proxy) -> str:
    """What a proxy's 407 asks of the operator: credentials in its URL, or, given there, others."""
    if proxy.authorization is None:
        return " (it asks for credentials: give them in its URL, http://user:password@host:port)"
    return (
        f" (it refused the credentials in {proxy.variable}'s URL: check them, each of their characters /, ?, #, @,"
        " : and % percent-encoded)"
    )


def _where(target: Http1Target) -> str:
    scheme, host, port = target.origin
    return f"{scheme}://{host}:{port}"


class _Tunnel(asyncio.Protocol):
    """A connection to a proxy until it answers CONNECT: `answer` has its status and reason once its head is in, read
    by httptools as every answer here is."""

    __slots__ = ("_body", "_head_bytes", "_parser", "_reason", "_status", "answer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[tuple[int, str]] = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._status = 0
        self._body = False
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._refuse(f"the proxy's answer to CONNECT is not HTTP: {exc}")
        if not self._status:
            if self._head_bytes > MAX_HEAD:
                self._refuse(f"the proxy's answer to CONNECT is over {MAX_HEAD} bytes")
        elif self._body and 200 <= self._status < 300:  # the upstream speaks only after the TLS client's hello
            self._refuse("the proxy sent bytes of its own into the tunnel")
        else:
            self.answer.set_result((self._status, self._reason.decode("latin-1")))

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._refuse("the proxy closed the connection before answering CONNECT")

    def _refuse(self, why: str) -> None:
        if not self.answer.done():
            self.answer.set_exception(httpx2.ProxyError(why))


class _Connection(asyncio.Protocol):
    """One connection and the answer being read on it: the parser's callbacks fill the answer's state, and the one
    request using the connection waits (`_wait`) until there is something for it."""

    __slots__ = (
        "_body",
        "_buffered",
        "_complete",
        "_error",
        "_finishing",
        "_head_bytes",
        "_head_done",
        "_headers",
        "_interim",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_poll",
        "_pool",
        "_reason",
        "_since",
        "_started",
        "_status",
        "_timeout",
        "_timer",
        "_timer_due",
        "_unbodied",
        "_waiter",
        "_whole",
        "_whole_limit",
        "busy",
        "idle",
        "idle_since",
        "lost",
        "origin",
        "sent",
        "served",
        "slot",
        "transport",
    )

    def __init__(self, pool: Http1Pool, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        self._pool, self._loop, self.origin = pool, loop, origin
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = self.idle = self.lost = self.slot = self.sent = self.served = False
        self._poll: select.poll | None = None
        self.idle_since = 0.0
        self._timeout: float | None = None
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._finishing: asyncio.TimerHandle | None = None
        """While the rest of an answer its request is done with is awaited (`finish`): the timer that gives up."""
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers: RawHeaders = []
        self._body: list[bytes] = []
        self._buffered = 0
        self._started = self._head_done = self._complete = self._keep_alive = self._interim = self._whole = False
        self._whole_limit: int | None = None
        self._head_bytes = 0
        self._unbodied = 0
        """Bytes read since the body's last piece, once the head is done: a chunk's framing, or the trailers."""
        self._error: BaseException | None = None

    # --- the request's side --------------------------------------------------------------------------------------

    def send(self, request: bytes, timeout_s: float | None) -> None:
        self._reset()
        if self._paused:  # the last answer was not all taken (a complete one may be left unread)
            self._resume()
        self.sent = self.served = True
        self._timeout = timeout_s
        assert self.transport is not None
        self.transport.write(request)

    async def head(self) -> None:
        """Waits for the answer's status line and headers."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    def stale(self) -> bool:
        """Whether the socket of this connection, which has answered before, has something the loop has not read yet:
        its server's FIN (a server that closes a kept-alive connection right after answering, or its idle timeout just
        now), or bytes nobody asked for. Either way it cannot be trusted with a request. (One poll(2), no wait.)"""
        return self._poll is not None and bool(self._poll.poll(0))

    def answer(self) -> tuple[int, bytes, RawHeaders]:
        return self._status, self._reason, self._headers

    async def whole(self, limit: int | None = None) -> list[bytes]:
        """The rest of the body, once the answer has ended (read into memory, so no pause at HIGH_WATER); a
        MalformedAnswerError as soon as it is over `limit` bytes."""
        self._whole, self._whole_limit = True, limit
        if self._paused:
            self._resume()
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        if limit is not None and self._buffered > limit:  # all of it came at once
            raise MalformedAnswerError(f"the body is over {limit} bytes")
        body, self._body, self._buffered = self._body, [], 0
        return body

    async def piece(self) -> bytes | None:
        """The body that has arrived and not been taken, as soon as there is some; None at the end of the answer."""
        while True:
            if self._body:
                body = self._body
                self._body, self._buffered = [], 0
                if self._paused:
                    self._resume()
                return body[0] if len(body) == 1 else b"".join(body)
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait()

    @property
    def reusable(self) -> bool:
        # Its request written whole, too: an upstream that answered early (a 413 to a large body) and stopped reading
        # leaves the rest unsent, ahead of the next request, which would wait out its read timeout behind it.
        return (
            self._complete
            and self._keep_alive
            and not self.lost
            and self.transport is not None
            and not self.transport.get_write_buffer_size()
        )

    def finish(self, grace_s: float) -> None:
        """Its request is done with an answer that may not have ended: back to the pool now if it has, else once it
        does within `grace_s` (the rest read and thrown away), else closed. Nothing waits for it."""
        if self._complete or self.lost or not self._keep_alive or self._error is not None:
            self._pool._release(self, reuse=self.reusable)
            return
        self._body, self._buffered, self._whole = [], 0, True  # nothing kept, nothing paused
        if self._paused:
            self._resume()
        self._finishing = self._loop.call_later(grace_s, self._finished, False)

    def _finished(self, ended: bool) -> None:
        timer, self._finishing = self._finishing, None
        if timer is not None:
            timer.cancel()
            self._pool._release(self, reuse=ended and self.reusable)

    def close(self) -> None:
        """Closes the connection now (a FIN, as aiohttp closes one: the upstream sees its caller went away), or resets
        it while some of the request is still to be written: a FIN would wait behind it for as long as the upstream
        does not read, the socket held open all that time and the upstream none the wiser."""
        self.lost = True
        # Nothing more is read of its answer: what came and was not taken (a body over its bound, one cut short) goes
        # now. The connection lives on, in a cycle with its parser, until a full garbage collection.
        self._body, self._buffered = [], 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    def _wait(self) -> asyncio.Future[None]:
        waiter = self._waiter = self._loop.create_future()
        timeout = self._timeout
        if timeout is not None:
            now = self._since = self._loop.time()
            due = now + timeout
            if self._timer is None or self._timer_due > due + _SLACK_S:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer, self._timer_due = self._loop.call_at(due, self._on_timer), due
        return waiter

    def _on_timer(self) -> None:
        """The read timer: one per connection, re-armed when it fires early (the wait it was armed for ended, or
        bytes arrived since): a ReadTimeout once nothing came for the whole read timeout."""
        self._timer = None
        timeout = self._timeout
        if self._waiter is None or self._waiter.done() or timeout is None:
            return
        due = self._since + timeout
        if due > self._loop.time() + _SLACK_S:
            self._timer, self._timer_due = self._loop.call_at(due, self._on_timer), due
            return
        what = "the rest of the answer" if self._head_done else "an answer"
        self._fail(httpx2.ReadTimeout(f"no byte of {what} in {timeout:g} s"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()
        if self._finishing is not None:
            self._finished(False)

    def _resume(self) -> None:
        self._paused = False
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    # --- asyncio's side ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP and TLS transports are not asyncio.Transport subclasses, but have all its methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self.sent:  # bytes nobody asked for, on an idle connection: it cannot be trusted with a request
            self.close()
            return
        if self._timeout is not None and self._waiter is not None:
            self._since = self._loop.time()
        if not self._head_done:
            room = MAX_HEAD - self._head_bytes
            self._head_bytes += len(data)
            if len(data) > room:  # the head must end within `room` bytes; what follows it is the body's, not counted
                self._feed(data[:room])
                if not self._head_done:
                    self._keep_alive = False
                    self._fail(MalformedAnswerError(f"not an HTTP answer: its head is over {MAX_HEAD // 1024} KiB"))
                    self.close()
                    return
                data = data[room:]
        else:
            self._unbodied += len(data)
        self._feed(data)
        if self._unbodied > MAX_HEAD and not self._complete:
            # Trailers without end, or one trailer line without end, which the parser holds in memory until it ends:
            # read for as long as they came (each read keeps the answer's timer from firing), they took gigabytes.
            self._keep_alive = False
            self._fail(MalformedAnswerError(f"not an HTTP answer: over {MAX_HEAD // 1024} KiB after its body's end"))
            self.close()
            return
        if self._whole:
            return
        if self._body:  # woken once a read, not once for each piece of a chunked body (a stream's event each)
            self._wake()
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._keep_alive = False
            self._fail(MalformedAnswerError("not an HTTP answer: a 101 Switching Protocols nobody asked for"))
        except httptools.HttpParserError as exc:
            self._keep_alive = False
            if not self._complete:  # else: bytes after the answer; the answer stands, the connection does not
                said = str(exc.__context__ or exc)[:200] if isinstance(exc, httptools.HttpParserCallbackError) else exc
                error = MalformedAnswerError(f"not an HTTP answer: {said}")
                error.__cause__ = exc
                self._fail(error)
        if self._complete and self._finishing is not None:
            # Back to the pool once the whole read is parsed, not as its answer ends: bytes after it in the same read
            # spoil the connection, which the next request would otherwise be given.
            self._finished(True)

    def eof_received(self) -> None:
        """The server is done sending (its FIN, or TLS's close_notify, which can come well before the connection is
        lost): never to be used again, and the transport closes (connection_lost ends or fails the answer)."""
        self.lost = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._finishing is not None:
            self._finished(False)
            return
        if not self.sent:  # idle (out of the pool now), or not yet used by the request it was handed to
            self._pool._lost_idle(self)
            return
        if self._complete or self._error is not None:
            self._wake()
            return
        cause = f": {exc}" if exc is not None else ""
        if self._head_done and self._ends_at_close() and exc is None:
            # A body without a length ends where the connection does, closed (a reset cuts it short: a ReadError).
            self._complete = True
            self._wake()
        elif not self._started:
            self._fail(httpx2.RemoteProtocolError(f"Server disconnected without sending a response{cause}"))
        else:
            self._fail(httpx2.ReadError(f"the connection closed before the answer ended{cause}"))

    def _ends_at_close(self) -> bool:
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return not (self._status in (204, 304) or 100 <= self._status < 200)

    # --- httptools' callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _AfterTheAnswer  # more after the answer: stop parsing (data_received keeps the answer)
        self._started = True

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # else a trailer of a chunked body: nobody reads them (data_received bounds them)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): skipped, the connection not reused
            if status < 100:  # llhttp takes any three digits: 000-099 is no status, not an interim answer
                raise _NoStatus(f"status {status:03d}")
            self._interim = True
            self._reason, self._headers = b"", []
            return
        self._status = status
        self._keep_alive = (
            self._parser.should_keep_alive() and not self._interim and self._parser.get_http_version() == "1.1"
        )
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._unbodied = 0
        if self._finishing is not None:
            return  # the rest of an answer its request is done with
        self._body.append(body)
        self._buffered += len(body)
        if self._whole and self._whole_limit is not None and self._buffered > self._whole_limit:
            self._keep_alive = False
            self._fail(MalformedAnswerError(f"the body is over {self._whole_limit} bytes"))

    def on_message_complete(self) -> None:
        if not self._head_done:  # the end of an interim answer
            return
        self._complete = True
        self._wake()


class _AfterTheAnswer(Exception):
    pass


class _NoStatus(Exception):
    pass


class Http1Response:
    """An answer, its status and headers read. Its body: `await read()` (whole), or `async for piece in response`
    (each piece the bytes that have arrived, never waiting for more; inflated, INFLATED_PIECE at most); read to its
    end, the connection goes back to the pool by itself. `close()` (or leaving `async with`) before the end closes the
    connection at once, so that the upstream sees the caller went away. A failure while reading closes it too."""

    __slots__ = ("_conn", "_inflate", "_pool", "_unreadable", "headers", "reason", "status")

    def __init__(self, pool: Http1Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        status, reason, headers = conn.answer()
        self.status = status
        self.reason = reason.decode("latin-1")
        self._inflate: _Inflate | None = None
        self._unreadable: str | None = None
        """A Content-Encoding the gateway does not decode (br, zstd): it asks for none, and the body is not read as
        if it were plain (a stream's first bytes were lost as a line that was no event, the rest relayed)."""
        for name, value in headers:
            if len(name) == 16 and name.lower() == b"content-encoding":
                coding = value.strip().lower()
                if coding in (b"gzip", b"x-gzip", b"deflate"):
                    self._inflate = _Inflate(coding)
                    # Said of the encoded body; httpx2.Response(headers=..., content=plain) would decode it again.
                    headers = [(n, v) for n, v in headers if n.lower() not in (b"content-encoding", b"content-length")]
                elif coding and coding != b"identity":
                    self._unreadable = coding.decode("latin-1")[:40]
                break
        self.headers: RawHeaders = headers
        """(name, value) as they came (less Content-Encoding and Content-Length once decoded), for
        httpx2.Response(headers=...)."""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if len(key) == len(wanted) and key.lower() == wanted:
                return value.decode("latin-1")
        return None

    @property
    def decoded(self) -> bool:
        """Whether the body comes decompressed (gzip or deflate): larger than what came on the wire."""
        return self._inflate is not None

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters: application/octet-stream when none is said (as
        aiohttp's ClientResponse.content_type)."""
        value = self.header("content-type")
        if not value:
            return "application/octet-stream"
        return value.split(";", 1)[0].strip().lower()

    async def read(self, limit: int | None = None) -> bytes:
        """The body, whole (decoded from gzip or deflate); a MalformedAnswerError, the connection closed, as soon as
        more than `limit` bytes of it have come."""
        conn = self._conn
        if conn is None:
            raise httpx2.StreamClosed()
        self._refuse_unreadable()
        try:
            body = await conn.whole(limit)
            data = body[0] if len(body) == 1 else b"".join(body)
            if self._inflate is not None:
                data = self._inflate.decode(data, limit) + self._inflate.flush()
        except BaseException:
            self.close()
            raise
        self.close()
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        self._refuse_unreadable()
        inflate = self._inflate
        try:
            while True:
                if inflate is not None and inflate.more:
                    # One read can inflate to gigabytes, its pieces there without a wait: the loop serves the others
                    # (and their timers) between them.
                    await asyncio.sleep(0)
                    if rest := inflate.rest():
                        return rest
                    continue
                piece = await conn.piece()
                if piece is None:
                    tail = inflate.flush() if inflate is not None else b""
                    self.close()
                    if tail:
                        return tail
                    raise StopAsyncIteration
                if inflate is not None:
                    piece = inflate.piece(piece)
                    if not piece:
                        continue
                return piece
        except StopAsyncIteration:
            raise
        except BaseException:
            self.close()
            raise

    def _refuse_unreadable(self) -> None:
        if self._unreadable is not None:
            self.close()
            raise MalformedAnswerError(
                f"the answer is encoded as {self._unreadable!r} (Content-Encoding), which the gateway did not ask for"
                " and cannot decode (it decodes gzip and deflate)"
            )

    def release_after(self, grace_s: float) -> None:
        """Done with an answer that came whole by its own content (a stream's last event), its end perhaps still on
        the way (an end marker, the body's last chunk): the connection goes back to the pool once that has come,
        within `grace_s`, else it is closed (`_Connection.finish`). Nothing waits for it."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish(grace_s)

    def close(self) -> None:
        """Done with the answer: the connection back to the pool if the answer was read to its end and the server
        keeps it open, else closed at once. Twice is harmless."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool._release(conn, reuse=conn.reusable)

    async def __aenter__(self) -> Http1Response:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class _Inflate:
    """gzip, its members one after another (RFC 1952 allows a body of several), or deflate as servers send it:
    zlib-wrapped, or raw (the first bytes say which)."""

    __slots__ = ("_decoder", "_ended", "_gzip", "_raw_fallback", "more")

    def __init__(self, coding: bytes) -> None:
        self._gzip = coding != b"deflate"
        self._decoder = zlib.decompressobj(_GZIP_WBITS if self._gzip else zlib.MAX_WBITS)
        self._raw_fallback = not self._gzip
        self._ended = False
        """Bytes that start no gzip member came after the body's end: they and all after them are no part of it."""
        self.more = False
        """The last piece came to INFLATED_PIECE: what was read may inflate to more, for `rest` before any new read."""

    def decode(self, data: bytes, limit: int | None = None) -> bytes:
        """`data` decompressed; a MalformedAnswerError past `limit` bytes (a small body can inflate to gigabytes)."""
        out = self._inflate(data, 0 if limit is None else limit + 1)
        if limit is not None and len(out) > limit:
            raise MalformedAnswerError(f"the body is over {limit} bytes once decompressed")
        return out

    def piece(self, data: bytes) -> bytes:
        """The first INFLATED_PIECE bytes at most that `data` inflates to; `more` says whether it may hold more."""
        out = self._inflate(data, INFLATED_PIECE)
        self.more = len(out) == INFLATED_PIECE
        return out

    def rest(self) -> bytes:
        """The next INFLATED_PIECE bytes at most of what earlier pieces' data inflates to (`more`)."""
        return self.piece(self._decoder.unconsumed_tail)

    def _inflate(self, data: bytes, max_length: int) -> bytes:
        """At most `max_length` bytes (0: no bound) of what `data` inflates to, across gzip members; the rest of
        `data` is kept for the next call (the decoder's unconsumed_tail, or the next member's start)."""
        if self._ended:
            return b""
        out = self._decompress(data, max_length)
        # Rare: only at the end of a gzip member or of deflate's body.
        while self._decoder.eof and (after := self._decoder.unused_data):
            if not (self._gzip and _GZIP_MAGIC.startswith(after[:2])):
                # No part of the body (padding some servers add): ignored, as other clients ignore it, and dropped
                # with all that follows, not held in the decoder at its end.
                self._ended = True
                break
            if max_length and len(out) >= max_length:
                break  # the next member is for the next call: a decoder at its end keeps what follows it
            self._decoder = zlib.decompressobj(_GZIP_WBITS)
            out += self._decompress(after, max_length - len(out) if max_length else 0)
        return out

    def _decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            out = self._decoder.decompress(data, max_length)
        except zlib.error as exc:
            if not self._raw_fallback:
                raise MalformedAnswerError(f"not an HTTP answer: the body does not decompress: {exc}") from exc
            self._raw_fallback = False
            self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._decompress(data, max_length)
        self._raw_fallback = False
        return out

    def flush(self) -> bytes:
        try:
            out = self._decoder.flush()
        except zlib.error as exc:
            raise MalformedAnswerError(f"not an HTTP answer: the body does not decompress: {exc}") from exc
        if not self._decoder.eof:
            raise MalformedAnswerError("not an HTTP answer: the compressed body ends before its end")
        return out


_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
_GZIP_MAGIC: Final = b"\x1f\x8b"
"""How a gzip member starts."""


class Http1Transport(httpx2.AsyncBaseTransport):
    """httpx2's transport over an `Http1Pool`: the SDK's own requests (listing models for Health, a server's
    tokenizer) go out on the same connections as the completions `upstream_http` posts, within the same bounds. Their
    answers' bodies too: at most `max_body_bytes` once decompressed (a MalformedAnswerError past it, as
    `Http1Response.read` gives a completion's), where httpx2 would read any size into memory (a few KiB of gzip
    inflate to gigabytes). And their time: a request's read timeout bounds its whole answer, not each wait for a piece
    of it (an httpx2.ReadTimeout past it). Their callers (a count, a probe) wait for the answer whole; an upstream that
    trickles it would hold them for as long as it went on."""

    def __init__(self, pool: Http1Pool, max_body_bytes: int) -> None:
        self._pool = pool
        self._max_body_bytes = max_body_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        # Made per request: these requests are few and off the completion path.
        target = self._pool.target(str(request.url), request.headers, method=request.method)
        read_s = request.extensions.get("timeout", {}).get("read")
        deadline = _Deadline(read_s)
        response = await deadline.bound(self._pool.post(target, await request.aread(), read_s))
        return httpx2.Response(
            response.status,
            headers=response.headers,
            stream=_Body(response, self._max_body_bytes, deadline),
            request=request,
            extensions={"reason_phrase": response.reason.encode("latin-1"), "http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


T = TypeVar("T")


class _Deadline:
    """When the time `seconds` gives a request from now ends (None: never): what is awaited within it fails with an
    httpx2.ReadTimeout past it."""

    __slots__ = ("_at", "_seconds")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._at = None if seconds is None else asyncio.get_running_loop().time() + seconds

    async def bound(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout_at(self._at):
                return await awaitable
        except TimeoutError as exc:
            raise httpx2.ReadTimeout(f"no whole answer in {self._seconds:g} s") from exc


class _Body(httpx2.AsyncByteStream):
    """An answer's body as httpx2 reads it: piece by piece, each by `deadline`, `max_bytes` in all at most (a
    MalformedAnswerError, the connection closed, past it); closed when httpx2 is done with it."""

    def __init__(self, response: Http1Response, max_bytes: int, deadline: _Deadline) -> None:
        self._response = response
        self._max_bytes = max_bytes
        self._deadline = deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pieces = aiter(self._response)
        taken = 0
        while (piece := await self._deadline.bound(anext(pieces, None))) is not None:
            taken += len(piece)
            if taken > self._max_bytes:
                self._response.close()
                decompressed = " once decompressed" if self._response.decoded else ""
                raise MalformedAnswerError(f"the body is over {self._max_bytes} bytes{decompressed}")
            yield piece

    async def aclose(self) -> None:
        self._response.close()
