"""How a client reaches the gateway: the TLS rule, the credentials, and the channel options (the default service
config with its retry policy first, the caller's own after)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import grpc

from llmrelay.v1.service_config import SERVICE_CONFIG_JSON

ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]
ServiceConfig: TypeAlias = str | Mapping[str, Any] | None
"""A gRPC service config as JSON text or a dict; None for none (no retries by the channel)."""
SERVICE_CONFIG_OPTION: Final = "grpc.service_config"
DEFAULT_SERVICE_CONFIG: Final = SERVICE_CONFIG_JSON
"""The service config an AsyncClient's channel gets unless told otherwise: the contract's retry policy (UNAVAILABLE
only, three attempts at most, exponential backoff, the server's grpc-retry-pushback-ms honoured)."""


def _streams_not_retried(service_config: str) -> str:
    config = json.loads(service_config)
    # The most specific name wins: StreamComplete's own entry, with no retry policy, over its service's.
    config["methodConfig"].append({"name": [{"service": "llmrelay.v1.LLMService", "method": "StreamComplete"}]})
    return json.dumps(config, indent=2)


BLOCKING_SERVICE_CONFIG: Final = _streams_not_retried(SERVICE_CONFIG_JSON)
"""The service config a (blocking) Client's channel gets unless told otherwise: DEFAULT_SERVICE_CONFIG, but for
StreamComplete, which its channel does not retry: grpcio's blocking API (1.85) leaves a stream whose retry began after
its gateway died waiting for ever, past its deadline and its cancellation."""

_LOCAL_SCHEMES: Final = frozenset({"unix", "unix-abstract"})


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target names this machine: "localhost", or an IP address (as `ipaddress` reads one, strictly:
    127.000.000.001 and 127.1 are names) in 127.0.0.0/8, IPv4-mapped too (::ffff:127.0.0.1), or ::1, however spelled;
    with any port, by itself or behind the "dns:" or "passthrough:" scheme; "ipv4:"/"ipv6:" lists of loopback
    addresses only; a Unix socket ("unix:", "unix-abstract:"). A scheme other than these (xds:, a custom resolver) is
    not loopback: who knows where it resolves. The Go and TypeScript SDKs decide alike, step by step."""
    scheme, colon, rest = target.partition(":")
    if not colon:
        return _is_loopback_host(_host(target))
    scheme = scheme.lower()
    if scheme in _LOCAL_SCHEMES:
        return True
    if scheme in ("ipv4", "ipv6"):
        return all(_is_loopback_host(_host(part)) for part in rest.split(","))
    if scheme in ("dns", "passthrough"):
        if rest.startswith("//"):
            # dns://AUTHORITY/HOST:PORT: the authority is the DNS server to ask, the endpoint what is asked for.
            _, slash, endpoint = rest[2:].partition("/")
            return bool(slash) and _is_loopback_host(_host(endpoint))
        return _is_loopback_host(_host(rest))
    # No scheme gRPC resolves: "localhost:50051" and "[::1]:50051" read as a host and a port (any port: the name of
    # a service, or none).
    return _is_loopback_host(_host(target))


def _is_loopback_host(host: str) -> bool:
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # The ipaddress of older Pythons (3.11, early 3.12) calls ::ffff:127.0.0.1 not loopback; a socket reaches 127.0.0.1.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def _host(address: str) -> str:
    """The host of "host", "host:port", "[v6]:port", or a bare IPv6 address."""
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address
    if address.count(":") > 1:  # a bare IPv6 address, no port
        return address
    return address.rsplit(":", 1)[0] if ":" in address else address


def uses_tls(target: str, tls: bool | None) -> bool:
    """The TLS rule of the three SDKs: as `tls` says when set; otherwise plaintext only to a loopback target."""
    return tls if tls is not None else not is_loopback_target(target)


@dataclass(frozen=True)
class ChannelSettings:
    """How a client makes its channel (see Client for each field)."""

    tls: bool | None = None
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    credentials: grpc.ChannelCredentials | None = None
    service_config: ServiceConfig = DEFAULT_SERVICE_CONFIG
    options: ChannelOptions = ()

    def credentials_for(self, target: str) -> grpc.ChannelCredentials | None:
        """The channel credentials to reach `target` (None: plaintext). Certificates or credentials given imply
        TLS; without them the TLS rule decides, and TLS trusts the system's roots."""
        certificates = (self.root_certificates, self.private_key, self.certificate_chain)
        for name, pem in zip(("root_certificates", "private_key", "certificate_chain"), certificates, strict=True):
            if pem is not None and not isinstance(pem, bytes):
                raise TypeError(
                    f"{name}: PEM bytes (Path.read_bytes(), or the text's .encode()), not {type(pem).__name__}"
                )
        given = any(c is not None for c in certificates)
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("a client certificate needs both private_key and certificate_chain (PEM bytes)")
        if self.credentials is not None and given:
            raise ValueError("give either credentials or the certificates they would be made of, not both")
        if self.tls is False and (given or self.credentials is not None):
            raise ValueError("tls=False with certificates or credentials: leave tls unset to use them, or drop them")
        if self.credentials is not None:
            return self.credentials
        if not uses_tls(target, True if given else self.tls):
            return None
        # Checked here: gRPC takes any bytes, then fails every call UNAVAILABLE, "Failed to create security
        # handshaker", which names no argument.
        if problem := root_certificates_problem(self.root_certificates):
            raise ValueError(f"root_certificates: {problem}")
        if problem := client_certificate_problem(self.private_key, self.certificate_chain):
            raise ValueError(f"private_key and certificate_chain: {problem}")
        return grpc.ssl_channel_credentials(*certificates)

    def channel_options(self) -> list[tuple[str, Any]]:
        return channel_options(self.service_config, self.options)

    def security_hint(self, target: str) -> str | None:
        """What the TLS rule chose for `target` and how to choose otherwise, for an error that says the gateway
        could not be reached (its usual cause: a gateway that speaks the other one, which says nothing of TLS);
        None when the caller chose. The Go and TypeScript SDKs add the same."""
        certificates = (self.root_certificates, self.private_key, self.certificate_chain)
        if self.tls is not None or self.credentials is not None or any(c is not None for c in certificates):
            return None
        if uses_tls(target, None):
            return (
                "the client connected over TLS with the system's roots, its default for a target that is not "
                "loopback; for a plaintext gateway pass tls=False, for a private CA root_certificates=; the llmrelay "
                "command takes --no-tls and --ca-file"
            )
        return (
            "the client connected in plaintext, its default for a loopback target; for a gateway that serves TLS "
            "pass tls=True, or root_certificates= for a private CA; the llmrelay command takes --tls and --ca-file"
        )

    def client_certificate_hint(self) -> str | None:
        """What to do when a TLS gateway closed the connection in the handshake without a word ("Socket closed"), as
        one that asks for a client certificate (mutual TLS) does when it is given none, or one its client CA did not
        issue; None with credentials of the caller's own (what they present is not known). For a TLS channel."""
        if self.credentials is not None:
            return None
        if self.certificate_chain is None:
            return (
                "if the gateway asks for a client certificate (mutual TLS), this client gave none: pass private_key= "
                "and certificate_chain= of one its server.tls.client_ca_file trusts; the llmrelay command takes "
                "--cert and --cert-key"
            )
        return (
            "if the gateway asks for a client certificate (mutual TLS), it did not take this client's: it must be "
            "issued by a CA in the gateway's server.tls.client_ca_file"
        )


_PEM_CERTIFICATE: Final = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def target_problem(target: str) -> str | None:
    """What keeps `target` from being a gRPC target (Client's target, the llmrelay command's --target); None when
    nothing does. Never the target itself: a URL may hold a password."""
    if target.lower().startswith(("http://", "https://")):
        # gRPC would resolve it as a host name, fail every call "Misformatted domain name", and be told TLS.
        return "a gRPC target is HOST:PORT (or dns:, unix:, ...), not an http:// or https:// URL"
    if any(int(port) > 65535 for port in _target_ports(target)):
        # gRPC's core takes the port modulo 65536: 102775 connected to 37239, another server, sent the caller's key.
        return "its port is not a number from 0 to 65535"
    return None


def _target_ports(target: str) -> list[str]:
    """The ports, as written in decimal, of the addresses a HOST:PORT, [V6]:PORT, dns: or ipv4:/ipv6: target names
    (none for a Unix socket, or an address without one)."""
    scheme, colon, rest = target.partition(":")
    if colon and scheme.lower() == "dns":
        addresses = [rest.removeprefix("//").partition("/")[2] if rest.startswith("//") else rest]
    elif colon and scheme.lower() in ("ipv4", "ipv6"):
        addresses = rest.split(",")
    elif colon and scheme.lower() in _LOCAL_SCHEMES:
        addresses = []
    else:
        addresses = [target]
    ports = []
    for address in addresses:
        if address.startswith("["):
            port = address.partition("]")[2].removeprefix(":")
        elif address.count(":") == 1:
            port = address.partition(":")[2]
        else:
            continue  # no port, or an IPv6 address bare
        if port.isascii() and port.isdigit():
            ports.append(port)
    return ports


def root_certificates_problem(pem: bytes | None) -> str | None:
    """What keeps TLS from trusting `pem` as its roots (the llmrelay command's --ca-file); None when nothing does, or
    none are given. Read in memory: the text around the certificates, which TLS skips, need not be ASCII."""
    if pem is None:
        return None
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        return "no PEM certificate in it (-----BEGIN CERTIFICATE-----)"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for block in blocks:  # one by one: a bundle with a damaged block besides good ones is trusted for those
        with contextlib.suppress(ssl.SSLError, ValueError):
            context.load_verify_locations(cadata=block.decode("ascii"))
            return None
    return f"none of its {len(blocks)} PEM certificates can be read (damaged, or not base64)"


def client_certificate_problem(private_key: bytes | None, certificate_chain: bytes | None) -> str | None:
    """What keeps TLS from presenting `certificate_chain` with `private_key` (the llmrelay command's --cert and
    --cert-key): a key that is not the certificate's, or either not PEM (the two swapped, say); None when nothing
    does, or either is not given. An encrypted key is refused too: gRPC takes no password. Python's ssl reads a key
    only from a file: they are put in files of memory alone (memfd), never on a disk (a key is a secret, and a
    container's file system may be read-only); where there are none (not Linux), not checked here, and gRPC's own
    refusal at the first call names no argument."""
    if private_key is None or certificate_chain is None:
        return None
    try:
        with _in_memory(certificate_chain) as certfile, _in_memory(private_key) as keyfile:
            return _pair_problem(certfile, keyfile)
    except (AttributeError, OSError):  # no os.memfd_create, or /proc to open it by
        return None


def _pair_problem(certfile: str, keyfile: str) -> str | None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certfile, keyfile, password=lambda: "")
    except ssl.SSLError as exc:
        # Of another algorithm than the certificate's (an EC key, an RSA certificate), the key finds no certificate.
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            return "the key is not the certificate's"
        if b"ENCRYPTED" in Path(keyfile).read_bytes():
            return "the key is encrypted, and gRPC takes no password: decrypt it (openssl pkey -in KEY -out PLAIN)"
        return "not a PEM certificate and its key (are they swapped?)"
    return None


@contextlib.contextmanager
def _in_memory(content: bytes) -> Iterator[str]:
    """`content` as a file of memory alone, by a path this process can open, closed after."""
    fd = os.memfd_create("llmrelay-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, content)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def channel_options(service_config: ServiceConfig, options: ChannelOptions) -> list[tuple[str, Any]]:
    """The channel's options: answers of any size (the gateway bounds them by its server.max_message_bytes, which an
    operator raises for large images, and with it its answers: gRPC's default of 4 MiB failed a large Embed after it
    was billed), the service config (JSON text or a dict; None for none), then the caller's options, which win where
    they set the same key."""
    merged: dict[str, Any] = {"grpc.max_receive_message_length": -1}
    if service_config is not None:
        text = service_config if isinstance(service_config, str) else json.dumps(service_config)
        merged[SERVICE_CONFIG_OPTION] = text
    merged.update(options)
    return list(merged.items())
