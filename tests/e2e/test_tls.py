"""TLS and mutual TLS on the listener, end to end: real gRPC channels and certificates made in the test; rotation on
disk without a restart; a certificate's end, warned of and exported; the start-up errors and the warnings of an exposed
listener."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from certs import KEY_ENCIPHERMENT_ONLY, Authority, Issued
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from e2e.test_metrics import scrape, value
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import clean_env, spawn_gateway
from llmrelay import v1 as pb
from llmrelay_server import tls as tls_module
from llmrelay_server.app import Gateway, start_gateway
from llmrelay_server.config import DEFAULT_OPEN_SERVICES, AuthConfig, ConfigError, TLSConfig, load_config
from llmrelay_server.tls import EXPIRY_WARNING_S, ServedCertificate, exposure_warnings
from llmrelay_server.workers import ListenError
from support import GatewayFactory, chat, two_backends, wait_until
from upstream import FakeUpstream

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Files:
    """Where the gateway's certificate, key and client CA live."""

    cert: Path
    key: Path
    client_ca: Path

    def section(self, *, mutual: bool = False) -> str:
        client_ca = f', client_ca_file: "{self.client_ca}"' if mutual else ""
        return f'{{cert_file: "{self.cert}", key_file: "{self.key}"{client_ca}}}'


TLSGatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "clients.pem")


@pytest.fixture
async def tls_gateway(tmp_path: Path, primary: FakeUpstream, local: FakeUpstream) -> AsyncIterator[TLSGatewayFactory]:
    """Starts gateways over the two fake upstreams with the given server.tls section. gateway_factory writes a server
    section of its own, and a YAML file has one."""
    started: list[Gateway] = []

    async def start(tls: str, listen: str = "127.0.0.1:0", more: str = "") -> Gateway:
        """`more`: other server settings, as YAML flow mapping entries."""
        path = tmp_path / "tls.yaml"
        more = f", {more}" if more else ""
        server = f'server: {{listen: "{listen}", usage_db: ":memory:", grace_period_s: 2, tls: {tls}{more}}}\n'
        path.write_text(server + two_backends(primary, local))
        gateway = await start_gateway(load_config({}, path))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop(grace_period_s=0, drain_s=0)


def secure(port: int, root: bytes, client: Issued | None = None) -> grpc.aio.Channel:
    """A channel that trusts `root` (and presents `client`) over a connection of its own: gRPC would otherwise share
    one between channels to the same address, and a test of new connections would reuse an old one."""
    key, cert = (client.key, client.cert) if client else (None, None)
    credentials = grpc.ssl_channel_credentials(root, key, cert)
    options = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


async def health(channel: grpc.aio.Channel) -> pb.HealthResponse:
    return await pb.LLMServiceStub(channel).Health(pb.HealthRequest(), timeout=5)


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health(channel)
    return caught.value.code()


async def until_served(port: int, root: bytes, within_s: float = 5.0) -> None:
    """Until a new connection trusting `root` gets an answer: the gateway looks at its files once a second."""
    async with asyncio.timeout(within_s):
        while True:
            async with secure(port, root) as channel:
                try:
                    await health(channel)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != UNAVAILABLE:
                        raise
            await asyncio.sleep(0.1)


def count_grpc_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times gRPC itself is made to load certificate files from now on (a server started and stopped, and
    lines of gRPC's own for each refusal): [count]."""
    checks = [0]
    check = tls_module._check_served_by_grpc

    def counted(*args: Any) -> None:
        checks[0] += 1
        check(*args)

    monkeypatch.setattr(tls_module, "_check_served_by_grpc", counted)
    return checks


async def connecting(port: int, roots: bytes, before: grpc.aio.Channel, done: Callable[[], bool]) -> None:
    """Rounds of eight new connections at once, with a call on `before` (a connection made earlier) meanwhile, until
    `done()`: every call is answered within health's deadline."""

    async def new_connection() -> None:
        async with secure(port, roots) as channel:
            await health(channel)

    while not done():
        await asyncio.gather(health(before), *(new_connection() for _ in range(8)))
        await asyncio.sleep(0.2)


def said(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


async def test_tls_serves_clients_that_trust_its_ca(tls_gateway: TLSGatewayFactory, files: Files) -> None:
    ca = Authority("llmrelay test CA")
    ca.server().write(files.cert, files.key)
    gateway = await tls_gateway(files.section())
    async with secure(gateway.port, ca.cert) as channel:
        assert (await health(channel)).backends
        answer = await pb.LLMServiceStub(channel).Complete(chat("over TLS"), timeout=5)
        assert answer.message.content == "echo: over TLS"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as plaintext:
        assert await refused(plaintext) == UNAVAILABLE
    async with secure(gateway.port, Authority("another CA").cert) as untrusting:
        assert await refused(untrusting) == UNAVAILABLE


async def test_connections_that_fail_the_handshake_add_no_line_of_grpcs_own_to_the_log(
    tmp_path: Path, files: Files, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """A plaintext client (or a port scan) on the TLS port: gRPC's core would write a line of its own format for each
    such connection (at INFO, which it logs unless told), one anyone reaching the port can add without end; and, at
    ERROR, one for each TLS server name the certificate does not match, the name as the client sent it (a newline
    in it forged a line of the gateway's own)."""
    Authority("llmrelay test CA").server().write(files.cert, files.key)
    config = tmp_path / "llmrelay.yaml"
    config.write_text(
        f'server: {{usage_db: ":memory:", drain_s: 0, tls: {files.section()}}}\n' + two_backends(primary, local)
    )
    gateway = await spawn_gateway(config, env=clean_env())
    try:
        await gateway.wait_listening()
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # HTTP/2 in plaintext
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
        async with grpc.aio.insecure_channel(gateway.target) as plaintext:
            assert await refused(plaintext) == UNAVAILABLE
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
        _, writer = await asyncio.open_connection(
            "127.0.0.1", gateway.port, ssl=unverified, server_hostname="forged.example"
        )
        writer.close()
    finally:
        assert await gateway.stop() == 0
    log = await gateway.output()
    assert "stopped" in log and "Handshake failed" not in log and "forged.example" not in log, log


async def test_mutual_tls_requires_a_certificate_from_the_client_ca(
    tls_gateway: TLSGatewayFactory, files: Files
) -> None:
    servers, clients = Authority("server CA"), Authority("client CA")
    servers.server().write(files.cert, files.key)
    files.client_ca.write_bytes(clients.cert)
    gateway = await tls_gateway(files.section(mutual=True))
    async with secure(gateway.port, servers.cert, clients.client()) as channel:
        answer = await pb.LLMServiceStub(channel).Complete(chat("mutual"), timeout=5)
        assert answer.message.content == "echo: mutual"
    async with secure(gateway.port, servers.cert) as anonymous:
        assert await refused(anonymous) == UNAVAILABLE
    async with secure(gateway.port, servers.cert, Authority("rogue CA").client()) as stranger:
        assert await refused(stranger) == UNAVAILABLE


async def test_text_around_the_certificates_need_not_be_ascii(tls_gateway: TLSGatewayFactory, files: Files) -> None:
    """`openssl pkcs12 -nokeys` writes "Bag Attributes" above each certificate, its friendlyName in Latin-1, and CA
    bundles carry comments in UTF-8: TLS skips them, and the start refused both files as holding no certificate."""
    servers, clients = Authority("server CA"), Authority("client CA")
    servers.server().write(files.cert, files.key)
    files.cert.write_bytes(b"Bag Attributes\n    friendlyName: Zertifikat M\xfcnchen\n" + files.cert.read_bytes())
    files.client_ca.write_bytes("# Issuer: CN=Autorit\u00e9 de test \u2014 clients\n".encode() + clients.cert)
    gateway = await tls_gateway(files.section(mutual=True))
    async with secure(gateway.port, servers.cert, clients.client()) as channel:
        answer = await pb.LLMServiceStub(channel).Complete(chat("annotated"), timeout=5)
        assert answer.message.content == "echo: annotated"
    async with secure(gateway.port, servers.cert, Authority("rogue CA").client()) as stranger:
        assert await refused(stranger) == UNAVAILABLE


async def test_a_rotated_certificate_serves_new_connections_without_a_restart(
    tls_gateway: TLSGatewayFactory, files: Files
) -> None:
    old, new = Authority("old CA"), Authority("new CA")
    old.server().write(files.cert, files.key)
    gateway = await tls_gateway(files.section())
    async with secure(gateway.port, old.cert) as before:
        await health(before)
        new.server().write(files.cert, files.key)
        await until_served(gateway.port, new.cert)
        async with secure(gateway.port, old.cert) as stale:
            assert await refused(stale) == UNAVAILABLE
        # The connection made before the rotation goes on: only new connections see the new certificate.
        await health(before)


@pytest.mark.parametrize("grpc_refuses", [False, True], ids=["a key as the certificate", "one gRPC refuses"])
async def test_a_broken_rotation_keeps_the_old_certificate(
    tls_gateway: TLSGatewayFactory,
    files: Files,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    grpc_refuses: bool,
) -> None:
    ca = Authority("llmrelay test CA")
    ca.server().write(files.cert, files.key)
    gateway = await tls_gateway(files.section())
    grpc_checks = count_grpc_checks(monkeypatch)
    if grpc_refuses:
        # Taken by OpenSSL's checks, logged as reloaded and its end made the metric's, while gRPC kept the old one.
        Authority("another CA").server(key_usage=KEY_ENCIPHERMENT_ONLY).write(files.cert, files.key)
        pasted = files.key.read_bytes()
    else:
        # A key pasted where the certificate belongs: refused, and its text never shows in the log.
        pasted = Authority("llmrelay test CA").server().key
        files.cert.write_bytes(pasted)
    async with asyncio.timeout(5):
        while "not reloaded" not in caplog.text:
            async with secure(gateway.port, ca.cert) as channel:
                await health(channel)
            await asyncio.sleep(0.1)
    assert "server.tls.cert_file" in caplog.text and "keep the previous one" in caplog.text
    assert "reloaded from" not in caplog.text
    assert pasted.decode().splitlines()[1] not in caplog.text
    # While the files stay as they are, connections come for a few checks' time: each one found the same files again,
    # gRPC's check (and its three lines of ERROR) ran again, and the gateway was held up for it.
    async with secure(gateway.port, ca.cert) as before:
        end = time.monotonic() + 3 * tls_module.CHECK_INTERVAL_S
        await connecting(gateway.port, ca.cert, before, lambda: time.monotonic() > end)
    assert said(caplog, "gRPC's TLS cannot serve it" if grpc_refuses else "holds no PEM certificate") == 1
    assert grpc_checks == [1 if grpc_refuses else 0]  # a key where the certificate belongs: found before gRPC's
    # Once the files are whole again, they are taken.
    new = Authority("new CA")
    new.server().write(files.cert, files.key)
    await until_served(gateway.port, new.cert)


def test_a_worker_started_while_the_files_cannot_be_used_serves_the_certificate_the_workers_last_took(
    files: Files, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With workers, a rotation half done (the new certificate in place, its key not yet) is what the running ones
    ride out, keeping the certificate in force; a worker restarted meanwhile (a crash, its heartbeat) read the files
    at its start, stopped, and was restarted again and again, its share of the port lost until they were whole."""
    kept = tmp_path / "run" / "tls"
    kept.parent.mkdir(mode=0o700)
    issued = Authority("llmrelay test CA").server()
    issued.write(files.cert, files.key)
    tls = TLSConfig(cert_file=str(files.cert), key_file=str(files.key))
    ServedCertificate(tls, kept=kept)  # the first worker
    files.key.write_bytes(Authority("another CA").server().key)  # the new key, for another certificate
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        ServedCertificate(tls)
    restarted = ServedCertificate(tls, kept=kept)
    assert restarted._in_force == (issued.cert, issued.key, None)
    assert "this worker serves the certificate the workers last took, until they can" in caplog.text
    assert {oct(path.stat().st_mode & 0o777) for path in kept.rglob("*.pem")} == {"0o600"}
    # Whole again (the rotation's certificate and key both in place), the files are taken and kept in turn, the
    # certificate kept before gone with its key.
    renewed = Authority("llmrelay test CA").server()
    renewed.write(files.cert, files.key)
    restarted._check_files()
    assert restarted._fetch() is not None and restarted._in_force == (renewed.cert, renewed.key, None)
    assert [path.read_bytes() for path in kept.rglob("key.pem")] == [renewed.key]
    # A certificate not valid yet: served by the running workers when its time comes, the files unchanged; by a
    # worker started meanwhile on the kept one too.
    ahead = Authority("llmrelay test CA").server(valid_from=timedelta(seconds=2))
    ahead.write(files.cert, files.key)
    started = ServedCertificate(tls, kept=kept)
    assert started._in_force == (renewed.cert, renewed.key, None)
    time.sleep(3)
    started._check_files()
    assert started._in_force == (ahead.cert, ahead.key, None)


def test_checking_a_certificate_leaves_nothing_open(files: Files) -> None:
    """Each check of new files has gRPC load them on a port of its own: left open, each check added a socket (a
    rotation gRPC refused was once checked again every second), until the process had no file descriptor left."""
    Authority("llmrelay test CA").server().write(files.cert, files.key)
    tls = TLSConfig(cert_file=str(files.cert), key_file=str(files.key))
    ServedCertificate(tls)  # the first check: gRPC's own descriptors opened, once a process
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        ServedCertificate(tls)
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_files_written_again_unchanged_are_no_reload(files: Files, caplog: pytest.LogCaptureFixture) -> None:
    """A renewal job that finds nothing to renew and writes the same files again, or a `touch`: the log said the
    certificate was reloaded, and gRPC was handed the same one, each time."""
    ca = Authority("llmrelay test CA")
    issued = ca.server()
    issued.write(files.cert, files.key)
    served = ServedCertificate(TLSConfig(cert_file=str(files.cert), key_file=str(files.key)))
    caplog.set_level(logging.INFO, logger="llmrelay_server.tls")

    def check() -> grpc.ServerCertificateConfiguration | None:
        """One look at the files, as the gateway's watch makes each second, and what the next handshake takes."""
        time.sleep(0.01)  # a later mtime than the last write's, on any file system's clock
        served._check_files()
        return served._fetch()

    issued.write(files.cert, files.key)
    os.utime(files.key)
    assert check() is None and caplog.text == ""
    renewed = ca.server()
    renewed.write(files.cert, files.key)
    assert check() is not None and said(caplog, "reloaded from") == 1
    # Broken, then put back as it was: said to be right again, not reloaded.
    files.cert.write_bytes(renewed.key)
    assert check() is None and said(caplog, "not reloaded") == 1
    renewed.write(files.cert, files.key)
    assert check() is None and said(caplog, "in force again") == 1 and said(caplog, "reloaded from") == 1
    issued.write(files.cert, files.key)  # the first one again: it is no longer the one in force
    assert check() is not None and said(caplog, "reloaded from") == 2


async def test_a_certificate_rotated_in_before_its_time_is_taken_when_it_comes(
    tls_gateway: TLSGatewayFactory, files: Files, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issued with a start a little ahead of this machine's clock (another machine's): not served before it is valid,
    and served from then on, though the files do not change again. Connections come all along, several at once: the
    check ran in gRPC's certificate callback, each second a connection came, with gRPC's own check of the files (a
    server started and stopped), and new connections and calls on those already open waited seconds for it."""
    old, new = Authority("old CA"), Authority("new CA")
    old.server().write(files.cert, files.key)
    gateway = await tls_gateway(files.section())
    grpc_checks = count_grpc_checks(monkeypatch)
    caplog.set_level(logging.INFO, logger="llmrelay_server.tls")
    async with secure(gateway.port, old.cert) as before:
        await health(before)
        # Room for two checks before it is valid (notBefore is cut to the second): the first may come between the
        # two files' writes, and finds the new certificate with the old key.
        new.server(valid_from=timedelta(seconds=5)).write(files.cert, files.key)
        async with asyncio.timeout(12):
            await connecting(gateway.port, old.cert + new.cert, before, lambda: "reloaded from" in caplog.text)
    await until_served(gateway.port, new.cert)
    assert said(caplog, "certificate is not yet valid") == 1 and said(caplog, "reloaded from") == 1
    assert grpc_checks == [1]  # the dates looked at again each second; the rest once


EXPIRY = "llmrelay_tls_certificate_expiry_timestamp_seconds"


def _not_after(issued: Issued) -> float:
    return x509.load_pem_x509_certificate(issued.cert).not_valid_after_utc.timestamp()


def _expiry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the certificate served" in r.getMessage()]


async def test_a_certificate_near_its_end_is_warned_of_and_its_end_is_a_metric(
    tls_gateway: TLSGatewayFactory, files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Authority("llmrelay test CA")
    ending = ca.server(valid_for=timedelta(days=3))
    ending.write(files.cert, files.key)
    gateway = await tls_gateway(files.section(), more='metrics_listen: "127.0.0.1:0"')
    assert gateway.metrics is not None and gateway.metrics.port is not None
    (warning,) = _expiry_lines(caplog)
    assert f"server.tls.cert_file: {files.cert}" in warning and "expires on" in warning and "(in 3 days)" in warning
    assert "renewed" in warning
    assert value(await scrape(gateway.metrics.port), EXPIRY) == _not_after(ending)
    # Renewed on disk while no new connection comes (clients keep theirs): the metric follows all the same, or an
    # alert on it fires for a renewal that did happen; a year's certificate is not warned of.
    caplog.set_level(logging.INFO, logger="llmrelay_server.tls")
    renewed = ca.server(valid_for=timedelta(days=365))
    renewed.write(files.cert, files.key)
    await wait_until(lambda: "reloaded from" in caplog.text, timeout_s=5)
    assert value(await scrape(gateway.metrics.port), EXPIRY) == _not_after(renewed)
    assert len(_expiry_lines(caplog)) == 1
    await until_served(gateway.port, ca.cert)


async def test_an_eddsa_certificate_is_warned_of_as_grpc_clients_refuse_it(
    tls_gateway: TLSGatewayFactory, files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    """An Ed25519 certificate passes every check and serves, but no grpcio client (this project's Python SDK and
    command among them) completes a handshake with it: "Socket closed", naming nothing, unless the start says why."""
    ca = Authority("llmrelay test CA")
    ca.server(curve=None).write(files.cert, files.key)
    gateway = await tls_gateway(files.section())
    (warning,) = [r.getMessage() for r in caplog.records if "EdDSA" in r.getMessage()]
    assert f"server.tls.cert_file: {files.cert}" in warning and "serve an EC (P-256, P-384) or RSA" in warning
    async with secure(gateway.port, ca.cert) as channel:
        assert await refused(channel) == UNAVAILABLE
    # A renewal with an EC key serves them, and is not warned of.
    caplog.set_level(logging.INFO, logger="llmrelay_server.tls")
    ca.server().write(files.cert, files.key)
    await wait_until(lambda: "reloaded from" in caplog.text, timeout_s=5)
    await until_served(gateway.port, ca.cert)
    assert len([r for r in caplog.records if "EdDSA" in r.getMessage()]) == 1


async def test_without_tls_there_is_no_certificate_metric(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway = await gateway_factory(two_backends(primary, local), server='metrics_listen: "127.0.0.1:0"')
    assert gateway.metrics is not None and gateway.metrics.port is not None
    assert not [name for name, _ in await scrape(gateway.metrics.port) if name == EXPIRY]


def test_an_ending_certificate_is_warned_of_once_a_day_and_when_it_has_ended(
    files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    issued = Authority("llmrelay test CA").server(valid_for=timedelta(days=20))
    issued.write(files.cert, files.key)
    now = [_not_after(issued) - EXPIRY_WARNING_S - 3600]
    served = ServedCertificate(TLSConfig(cert_file=str(files.cert), key_file=str(files.key)), clock=lambda: now[0])

    def said_after(seconds: float) -> list[str]:
        caplog.clear()
        now[0] += seconds
        served.warn_of_expiry()
        return _expiry_lines(caplog)

    assert said_after(0) == []  # more than EXPIRY_WARNING_S left
    assert [r.levelno for r in caplog.records] == []
    (first,) = said_after(2 * 3600)
    assert "(in 14 days)" in first
    assert said_after(3600) == [] and said_after(20 * 3600) == []  # said once a day
    (again,) = said_after(3 * 3600)
    assert "(in 13 days)" in again
    (last_hours,) = said_after(EXPIRY_WARNING_S - 2 * 86_400 + 4 * 3600)
    assert "(in 19 hours)" in last_hours
    (ended,) = said_after(20 * 3600)  # ended: said at once, as an error
    assert "expired on" in ended and "clients refuse every new connection" in ended
    assert caplog.records[-1].levelno == logging.ERROR
    assert said_after(3600) == []


def _missing_cert(files: Files, ca: Authority) -> None:
    files.cert.unlink()


def _directory_as_key(files: Files, ca: Authority) -> None:
    files.key.unlink()
    files.key.mkdir()


def _key_as_cert(files: Files, ca: Authority) -> None:
    files.cert.write_bytes(files.key.read_bytes())


def _garbage_key(files: Files, ca: Authority) -> None:
    files.key.write_text("not a key\n")


def _another_certificates_key(files: Files, ca: Authority) -> None:
    files.key.write_bytes(ca.server().key)


def _expired(files: Files, ca: Authority) -> None:
    ca.server(valid_from=-timedelta(days=2), valid_for=timedelta(days=1)).write(files.cert, files.key)


def _not_yet_valid(files: Files, ca: Authority) -> None:
    ca.server(valid_from=timedelta(hours=1)).write(files.cert, files.key)


def _client_certificate(files: Files, ca: Authority) -> None:
    ca.client().write(files.cert, files.key)


def _chain_upside_down(files: Files, ca: Authority) -> None:
    files.cert.write_bytes(ca.cert + files.cert.read_bytes())


def _certificate_as_client_ca(files: Files, ca: Authority) -> None:
    files.client_ca.write_bytes(ca.client().cert)


def _garbage_client_ca(files: Files, ca: Authority) -> None:
    files.client_ca.write_bytes(b"\x30\x82\x01\x0a binary, not PEM")


def _rsa_key_of_an_ec_certificate(files: Files, ca: Authority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encoding, form = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    files.key.write_bytes(key.private_bytes(encoding, form, serialization.NoEncryption()))


def _ec_without_digital_signature(files: Files, ca: Authority) -> None:
    ca.server(key_usage=KEY_ENCIPHERMENT_ONLY).write(files.cert, files.key)


def _secp256k1(files: Files, ca: Authority) -> None:
    ca.server(curve=ec.SECP256K1()).write(files.cert, files.key)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_missing_cert, r"server\.tls\.cert_file: \S+server\.pem cannot be read \(No such file or directory\)"),
        (_directory_as_key, r"server\.tls\.key_file: \S+server\.key cannot be read \(Is a directory\)"),
        (_key_as_cert, r"server\.tls\.cert_file: \S+server\.pem holds no PEM certificate"),
        (_garbage_key, r"server\.tls\.key_file: \S+server\.key holds no PEM private key"),
        (_another_certificates_key, r"server\.tls\.key_file: \S+ is not the key of the certificate in server\.tls"),
        # OpenSSL's words were its reason's name alone: NO_CERTIFICATE_ASSIGNED.
        (_rsa_key_of_an_ec_certificate, r"server\.tls\.key_file: \S+ is not the key of the certificate in server"),
        (_chain_upside_down, r"server\.tls\.key_file: .* in a chain, the gateway's own certificate comes first"),
        (_expired, r"server\.tls\.cert_file: \S+: clients would refuse its certificate: certificate has expired"),
        (_not_yet_valid, r"server\.tls\.cert_file: \S+: clients would refuse its certificate: certificate is not yet"),
        (_client_certificate, r"server\.tls\.cert_file: \S+: clients would refuse its certificate: unsuitable"),
        (_certificate_as_client_ca, r"server\.tls\.client_ca_file: \S+clients\.pem holds no CA certificate"),
        (_garbage_client_ca, r"server\.tls\.client_ca_file: \S+clients\.pem holds no PEM certificate"),
        # OpenSSL takes these, gRPC's BoringSSL does not: the start said the port was in use, or the files changing.
        (_ec_without_digital_signature, r"server\.tls\.cert_file: \S+: gRPC's TLS cannot serve it with server\.tls"),
        (_secp256k1, r"server\.tls\.cert_file: \S+: (gRPC's TLS cannot serve it|a TLS handshake with it fails)"),
    ],
)
async def test_an_unusable_file_stops_the_start_naming_the_field(
    tls_gateway: TLSGatewayFactory, files: Files, breakage: Callable[[Files, Authority], None], message: str
) -> None:
    ca = Authority("llmrelay test CA")
    ca.server().write(files.cert, files.key)
    files.client_ca.write_bytes(ca.cert)
    key = files.key.read_bytes()
    breakage(files, ca)
    with pytest.raises(ConfigError, match=message) as caught:
        await tls_gateway(files.section(mutual=True))
    assert key.decode().splitlines()[1] not in str(caught.value)


async def test_a_taken_port_fails_with_tls_as_without(tls_gateway: TLSGatewayFactory, files: Files) -> None:
    Authority("llmrelay test CA").server().write(files.cert, files.key)
    first = await tls_gateway(files.section())
    with pytest.raises(ListenError, match="in use"):
        await tls_gateway(files.section(), listen=f"127.0.0.1:{first.port}")


def _insecure(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "NOT SECURE" in r.getMessage()]


async def test_a_listener_off_loopback_without_tls_or_keys_warns(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await gateway_factory(two_backends(primary, local), {"LLMRELAY_LISTEN": "0.0.0.0:0"})
    plaintext, open_door = _insecure(caplog)
    assert f"0.0.0.0:{gateway.port} without TLS" in plaintext and "set server.tls" in plaintext
    assert f"0.0.0.0:{gateway.port} with no caller keys" in open_door and "auth.keys" in open_door


async def test_a_loopback_listener_does_not_warn(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    await gateway_factory(two_backends(primary, local))
    assert _insecure(caplog) == []


@pytest.mark.parametrize("listen", ["LOCALHOST:0", "Localhost:0", "[::ffff:127.0.0.1]:0"])
async def test_a_loopback_listener_written_otherwise_does_not_warn(
    gateway_factory: GatewayFactory,
    primary: FakeUpstream,
    local: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    listen: str,
) -> None:
    """A host name's case does not matter (gRPC serves LOCALHOST at 127.0.0.1 and ::1 alone), and ::ffff:127.0.0.1 is
    IPv4's loopback, which Python's ipaddress calls loopback only from 3.13: each logged two NOT SECURE warnings, "no
    TLS" and "no caller keys", for a gateway no other machine could reach."""
    gateway = await gateway_factory(two_backends(primary, local), {"LLMRELAY_LISTEN": listen})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert _insecure(caplog) == []


TLS = TLSConfig(cert_file="server.pem", key_file="server.key")
MUTUAL = TLSConfig(cert_file="server.pem", key_file="server.key", client_ca_file="clients.pem")
OPEN = AuthConfig()
OPENED = (*DEFAULT_OPEN_SERVICES, "llmrelay.v1.LLMService/GetUsage", "llmrelay.v1.LLMService")


@pytest.mark.parametrize(
    ("address", "tls", "auth", "exposed"),
    [
        ("127.0.0.1:50051", None, OPEN, []),
        ("127.0.0.2:50051", None, OPEN, []),
        ("[::1]:50051", None, OPEN, []),
        ("localhost:50051", None, OPEN, []),
        ("LocalHost:50051", None, OPEN, []),
        ("[::ffff:127.0.0.1]:50051", None, OPEN, []),
        ("[::ffff:10.0.0.5]:50051", None, OPEN, ["without TLS", "no caller keys"]),
        ("localhost.evil.example:50051", None, OPEN, ["without TLS", "no caller keys"]),
        ("0.0.0.0:50051", None, OPEN, ["without TLS", "no caller keys"]),
        ("[::]:50051", None, OPEN, ["without TLS", "no caller keys"]),
        ("gateway.internal:50051", None, OPEN, ["without TLS", "no caller keys"]),
        ("10.0.0.5:50051", TLS, OPEN, ["no caller keys"]),
        ("10.0.0.5:50051", TLS, AuthConfig(keys_file="keys.yaml"), []),
        ("10.0.0.5:50051", None, AuthConfig(keys_file="keys.yaml"), ["without TLS"]),
        # Client certificates keep out whoever has none.
        ("10.0.0.5:50051", MUTUAL, OPEN, []),
        # Keys, but the model calls or the ledger open to callers without one.
        ("10.0.0.5:50051", TLS, AuthConfig(keys_file="keys.yaml", open_services=OPENED), ["opening", "opening"]),
        ("127.0.0.1:50051", None, AuthConfig(keys_file="keys.yaml", open_services=OPENED), []),
        ("10.0.0.5:50051", MUTUAL, AuthConfig(keys_file="keys.yaml", open_services=OPENED), []),
    ],
)
def test_what_a_listener_exposes(address: str, tls: TLSConfig | None, auth: AuthConfig, exposed: list[str]) -> None:
    warnings = exposure_warnings(address, tls, auth)
    phrases = ("without TLS", "no caller keys", "opening")
    assert [phrase for w in warnings for phrase in phrases if phrase in w] == exposed


def test_opening_what_keys_guard_says_what_anyone_may_then_do() -> None:
    """Opened by mistake, GetUsage showed every caller's usage to anyone, and the models served anyone, keys or not,
    with no word at start."""
    auth = AuthConfig(keys_file="keys.yaml", open_services=OPENED)
    usage, models = exposure_warnings("10.0.0.5:50051", TLS, auth)
    assert "opening llmrelay.v1.LLMService/GetUsage to callers without a key" in usage
    assert "can read every caller's usage; take it out of auth.open_services" in usage
    assert "opening llmrelay.v1.LLMService to callers without a key" in models
    assert "can call the models on this gateway's upstream credentials" in models
