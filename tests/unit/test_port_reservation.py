"""The port a supervisor holds for its workers while they start (workers.reserve_port), on real sockets."""

from __future__ import annotations

import errno
import re
import socket

import pytest
from llmrelay_server.workers import ListenError, reserve_port

LOOPBACKS = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bind_error(family: socket.AddressFamily, host: str, port: int) -> int | None:
    """The errno of another process's plain bind of host:port (a server's, as a second gateway or any other would
    make), None when it could."""
    with socket.socket(family) as other:
        if family == socket.AF_INET6:
            other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            other.bind((host, port))
        except OSError as exc:
            return exc.errno
    return None


@pytest.mark.parametrize("written_port", ["given", "any"])
def test_localhost_is_held_at_both_loopbacks(written_port: str) -> None:
    """gRPC serves localhost at 127.0.0.1 and ::1: held at the first alone, another process took ::1 while the
    workers started, and callers of localhost that reached it got that process."""
    port = free_port() if written_port == "given" else 0
    with reserve_port(f"localhost:{port}") as reservation:
        assert port in (0, reservation.port)
        assert [bind_error(family, host, reservation.port) for family, host in LOOPBACKS] == [errno.EADDRINUSE] * 2
    assert [bind_error(family, host, reservation.port) for family, host in LOOPBACKS] == [None, None]


def test_a_port_taken_at_the_second_loopback_is_refused() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        squatter.bind(("::1", port))
        squatter.listen()
        with pytest.raises(ListenError, match="in use"):
            reserve_port(f"localhost:{port}")


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_every_address_is_held_on_both_stacks(host: str) -> None:
    """gRPC listens on [::] for 0.0.0.0 and [::], both stacks on one socket: held on IPv4 alone, another process
    could take the port on IPv6 while the workers started, and they served IPv4 alone, without a word."""
    port = free_port()
    with reserve_port(f"{host}:{port}") as reservation:
        assert reservation.port == port
        assert [bind_error(family, address, port) for family, address in LOOPBACKS] == [errno.EADDRINUSE] * 2
    assert [bind_error(family, address, port) for family, address in LOOPBACKS] == [None, None]


@pytest.mark.parametrize("held_at", ["::1", "::"])
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_every_address_with_the_port_taken_on_ipv6_is_refused(host: str, held_at: str) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        squatter.bind((held_at, port))
        squatter.listen()
        with pytest.raises(ListenError, match=re.escape(f"cannot listen on {host}:{port}: the address is in use")):
            reserve_port(f"{host}:{port}")
