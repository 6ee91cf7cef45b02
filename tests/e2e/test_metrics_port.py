"""/metrics's port against clients that hold its connections: one that sends its request a byte at a time, and more of
them than the server serves at once."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from llmrelay_server import metrics
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


@contextlib.contextmanager
def served(registry: CollectorRegistry) -> Iterator[int]:
    server = metrics.serve_metrics("127.0.0.1:0", registry)
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def counted() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("scraped", "A counter, to see in a scrape.", registry=registry).inc()
    return registry


def scrape(port: int, address: str = "127.0.0.1") -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://{address}:{port}/metrics", timeout=10
    ) as answer:
        return str(answer.read().decode())


def answer(connection: socket.socket, wait_s: float) -> bytes | None:
    """What the server sent on `connection` before it closed it (b"" for none, or a reset), or None if it did not
    within `wait_s`."""
    connection.settimeout(wait_s)
    received = b""
    try:
        while chunk := connection.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return received


def eventually(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "never happened"
        time.sleep(0.01)


def test_a_client_that_sends_its_request_a_byte_at_a_time_is_cut_off_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The timeout was each read's: a byte every few seconds held the connection, and its thread, for as long as the
    # client went on.
    deadline_s = 0.5
    monkeypatch.setattr(metrics._MetricsRequestHandler, "timeout", deadline_s)
    with served(counted()) as port, socket.create_connection(("127.0.0.1", port)) as slow:
        started = time.monotonic()
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            try:
                slow.send(bytes([byte]))
            except ConnectionError:
                break
            if answer(slow, deadline_s / 4) is not None or time.monotonic() - started > 10 * deadline_s:
                break
        assert time.monotonic() - started < 5 * deadline_s, "cut off by its deadline, not held on by each byte"
        assert "scraped_total 1.0" in scrape(port), "and the port goes on serving"


def test_connections_past_the_limit_add_no_thread_and_a_scrape_is_answered_meanwhile() -> None:
    # Each connection had a thread of its own, without limit, while it sent its request.
    limit = metrics.METRICS_CONNECTIONS
    with served(counted()) as port:
        threads = threading.active_count()
        held = []
        try:
            for _ in range(limit + 20):
                connection = socket.create_connection(("127.0.0.1", port), timeout=10)
                connection.sendall(b"GET /met")
                held.append(connection)
            time.sleep(0.5)
            assert threading.active_count() <= threads + limit + 2
            started = time.monotonic()
            assert "scraped_total 1.0" in scrape(port), "a scrape is answered while the limit's worth are held"
            assert time.monotonic() - started < metrics.METRICS_READ_TIMEOUT_S / 2, "at once, not once they time out"
            assert threading.active_count() <= threads + limit + 2
        finally:
            for connection in held:
                connection.close()


class _Blocking(Collector):
    """A collector that waits for `release`: each scrape holds its server thread until then."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.collecting = 0
        self._lock = threading.Lock()

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            self.collecting += 1
        self.release.wait(30)
        yield GaugeMetricFamily("released", "Whether the scrape was let go.", value=1)


def test_when_every_connection_is_being_answered_one_more_is_refused_without_a_thread() -> None:
    limit = metrics.METRICS_CONNECTIONS
    registry = CollectorRegistry()
    blocking = _Blocking()
    registry.register(blocking)
    answers: list[str] = []
    with served(registry) as port:
        scrapes = [threading.Thread(target=lambda: answers.append(scrape(port))) for _ in range(limit)]
        try:
            for thread in scrapes:
                thread.start()
            eventually(lambda: blocking.collecting == limit)
            threads = threading.active_count()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                extra.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                refusal = answer(extra, 5)
                assert refusal is not None, "refused at once, not left waiting for a thread"
                assert refusal == b"" or refusal.startswith(b"HTTP/1.0 503 "), refusal
                assert threading.active_count() <= threads
                assert blocking.collecting == limit
        finally:
            blocking.release.set()
            for thread in scrapes:
                thread.join(15)
    assert len(answers) == limit and all("released 1.0" in answer for answer in answers)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_every_address_is_served_on_ipv6_too_as_grpc_serves_it(host: str) -> None:
    """Bound to IPv4 alone, 0.0.0.0 refused every scrape of a cluster that reaches its pods by IPv6, while the
    gateway's gRPC port, on the same 0.0.0.0, answered its probes there."""
    server = metrics.serve_metrics(f"{host}:0", counted())
    try:
        port = int(server.server_port)
        for address in ("127.0.0.1", "[::1]"):
            assert "scraped_total 1.0" in scrape(port, address), address
    finally:
        server.shutdown()
        server.server_close()


def test_localhost_is_served_at_both_loopbacks_on_one_port_and_stopped_at_both() -> None:
    """gRPC takes localhost for 127.0.0.1 and ::1: /metrics took the first address getaddrinfo gave alone (::1 where
    /etc/hosts names it localhost too, as Debian's and Docker's do), and a Prometheus scraping the other was refused."""
    server = metrics.serve_metrics("localhost:0", counted())
    port = int(server.server_port)
    try:
        for address in ("127.0.0.1", "[::1]"):
            assert "scraped_total 1.0" in scrape(port, address), address
    finally:
        server.shutdown()
        server.server_close()
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as after, pytest.raises(ConnectionRefusedError):
            after.connect((address, port))


@pytest.mark.parametrize(("family", "taken"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_localhost_with_either_loopback_taken_is_refused(family: socket.AddressFamily, taken: str) -> None:
    """Served at the other alone, a scrape of the taken one reached another process."""
    with socket.socket(family) as holder:
        holder.bind((taken, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError) as refused:
            metrics.serve_metrics(f"localhost:{port}", counted()).server_close()
    assert refused.value.errno == errno.EADDRINUSE
