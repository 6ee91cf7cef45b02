"""TLS and mutual TLS on the listener, with gRPC's own credentials; certificates rotated on disk are picked up by new
connections without a restart, and one drawing near its end is warned of. And the warnings for a listener that others
can reach unprotected."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from llmrelay_server.config import AuthConfig, ConfigError, TLSConfig, shown_path
from llmrelay_server.health import SERVICE_NAME

log = logging.getLogger("llmrelay_server.tls")

CHECK_INTERVAL_S = 1.0
"""How often the files are looked at (a stat each), in the background; a read and the checks only when they changed."""
EXPIRY_WARNING_S = 14 * 86_400
"""A certificate served that ends within this is warned of: at the start, at a reload, and once a day."""
_WARNING_REPEAT_S = 86_400.0

# What tells a changed file: a rewrite in place changes mtime/ctime (and often the size), a rename or a Kubernetes
# secret's symlink swap changes the inode. None: the file could not be looked at (it is being replaced).
_Signature = tuple[tuple[int, int, int, int, int] | None, ...]
_Contents = tuple[bytes, bytes, bytes | None]
"""What cert_file, key_file and client_ca_file (None: no mutual TLS) hold."""
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def protection(tls: TLSConfig | None) -> str:
    """How the listener is protected, in words for the start-up log."""
    if tls is None:
        return "plaintext"
    return "mutual TLS" if tls.client_ca_file else "TLS"


def exposure_warnings(address: str, tls: TLSConfig | None, auth: AuthConfig) -> list[str]:
    """One line for each thing a listener off loopback exposes, with the fix; none on loopback."""
    host = address.rpartition(":")[0]
    if _is_loopback(host):
        return []
    warnings = []
    if tls is None:
        warnings.append(
            f"NOT SECURE: serving on {address} without TLS: prompts, answers and caller keys cross the network in"
            " plaintext; set server.tls (cert_file, key_file) or listen on 127.0.0.1"
        )
    # Under mutual TLS only holders of a client certificate get in, so no keys is not an open door.
    if tls is not None and tls.client_ca_file:
        return warnings
    if not auth.keys and not auth.keys_file:
        warnings.append(
            f"NOT SECURE: serving on {address} with no caller keys: anyone who can reach the port can call the models"
            " on this gateway's upstream credentials; set auth.keys or auth.keys_file, or listen on 127.0.0.1"
        )
        return warnings
    for entry in auth.open_services:
        service, _, method = entry.partition("/")
        if service == SERVICE_NAME and method != "Health":  # its Health is open by default, for probes
            exposed = (
                "read every caller's usage"
                if method == "GetUsage"
                else "call the models on this gateway's upstream credentials"
            )
            warnings.append(
                f"NOT SECURE: serving on {address} with auth.open_services opening {entry} to callers without a key:"
                f" anyone who can reach the port can {exposed}; take it out of auth.open_services"
            )
    return warnings


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost":  # gRPC takes it for 127.0.0.1 and ::1, whatever its case
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: it may resolve to any interface
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is IPv4's loopback (Python says so from 3.13 alone)
    return address.is_loopback


class ServedCertificate:
    """The certificate the listener serves: the configuration gRPC takes (`credentials`), a new one handed to it when
    the files change, and how long the one in force has left (`not_after`, warned of as its end draws near).

    Made before the port opens: ConfigError naming the field when a file cannot be read or used. With `kept` (a
    worker's: a directory of its supervisor's run directory), each certificate taken is kept there as well, and a
    worker started while the files cannot be used (a rotation half done, and a worker restarted after a crash) serves
    the one last kept, as the workers already running go on serving theirs, and takes the files once they are whole:
    it stopped at its start, restarted again and again, its share of the port lost."""

    def __init__(self, tls: TLSConfig, clock: Callable[[], float] = time.time, kept: Path | None = None) -> None:
        self._tls = tls
        self._clock = clock
        self._kept = kept
        self._paths = tuple(Path(p) for p in (tls.cert_file, tls.key_file, tls.client_ca_file) if p)
        # Looked at before reading: a change made while reading shows up as a new signature at the next check.
        self._seen = _signature(self._paths)
        self._judged: tuple[_Contents, str | None] | None = None
        """The files' contents last checked, and what is wrong with them whatever the date (None: nothing): gRPC's
        own check starts a server, and logs lines of its own for a refusal, so it runs once for each content."""
        self._said: tuple[_Signature, str] | None = None
        """The files' signature when a reload of them last failed, and why: said once, tried again at each check."""
        try:
            self._initial, self.not_after, self._in_force = self._load()
        except ConfigError as exc:
            if (restored := self._last_kept(exc)) is None:
                raise
            self._initial, self.not_after, self._in_force = restored
        else:
            self._keep()
        """`not_after`: when the certificate in force stops being valid, in Unix time (its notAfter); `_in_force`: the
        files' contents it was made of."""
        self._ready: grpc.ServerCertificateConfiguration | None = None
        """A configuration the background check has made of changed files, for gRPC to take at the next handshake."""
        self._handing = threading.Lock()
        self._expiry_said: tuple[float, float, bool] | None = None
        """The notAfter last warned of, when, and whether it had passed."""
        self._watching: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Looks at the files once a second, in the background, and says now, and then once a day, when the
        certificate in force ends within EXPIRY_WARNING_S."""
        self._warn_of_grpc_clients()
        self.warn_of_expiry()
        self._watching = asyncio.create_task(self._watch(), name="llmrelay-tls-watch")

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching

    async def _watch(self) -> None:
        """Not on a connection: a renewal shows in the metric and the warnings while clients keep the connections
        they have, and a certificate not valid yet is taken when its time comes whether anyone connects or not."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                # Off the event loop: reading and checking the files takes milliseconds, gRPC's check more.
                await asyncio.to_thread(self._check_files)
            except Exception:  # a check that fails in a way not foreseen must not end the watch: rotation would stop
                log.exception("server.tls: the certificate files could not be checked; tried again in a second")
            self.warn_of_expiry()

    def warn_of_expiry(self) -> None:
        """Logs how long the certificate in force has left, when it ends within EXPIRY_WARNING_S (or has ended): once
        for each certificate, and again a day later while it is still the one served."""
        now, not_after = self._clock(), self.not_after
        left_s = not_after - now
        if left_s > EXPIRY_WARNING_S:
            return
        expired = left_s <= 0
        if self._expiry_said is not None:
            said_of, said_at, said_expired = self._expiry_said
            if said_of == not_after and said_expired == expired and now - said_at < _WARNING_REPEAT_S:
                return
        self._expiry_said = not_after, now, expired
        ends = datetime.datetime.fromtimestamp(not_after, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        where = f"server.tls.cert_file: {self._tls.cert_file}"
        renew = "put a renewed one in its place: new connections take it without a restart"
        if expired:
            log.error(
                "%s: the certificate served expired on %s: clients refuse every new connection; %s", where, ends, renew
            )
        else:
            log.warning("%s: the certificate served expires on %s (in %s); %s", where, ends, _duration(left_s), renew)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            # The stubs say the fetcher must return a configuration; gRPC takes None as "keep the current one".
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=bool(self._tls.client_ca_file),
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC calls this before every TLS handshake, on one of its own threads, and the handshake waits for it: it
        only hands over what the background check has made ready (None: keep the current certificate)."""
        with self._handing:
            ready, self._ready = self._ready, None
        return ready

    def _check_files(self) -> None:
        """Reloads the files when they changed: what new connections get next, and the end of the certificate in
        force. Files that cannot be used are warned of once, and the previous certificate stays."""
        signature = _signature(self._paths)
        if signature == self._seen:
            return
        try:
            configuration, not_after, contents = self._load()
        except ConfigError as exc:
            # Not taken as seen: files that become usable without changing (a certificate not valid yet, whose time
            # comes) are taken at a later check.
            if (signature, str(exc)) != self._said:
                log.warning("TLS certificate not reloaded; new connections keep the previous one: %s", exc)
                self._said = signature, str(exc)
            return
        self._seen, failed, self._said = signature, self._said, None
        if contents == self._in_force:
            # Touched, or written again the same (a renewal job that found nothing to renew): nothing to hand over.
            if failed is not None:
                log.info("TLS certificate files hold the certificate in force again; new connections keep it")
            return
        with self._handing:
            self._ready = configuration
        self.not_after, self._in_force = not_after, contents
        self._keep()
        log.info("TLS certificate reloaded from %s; new connections use it", self._tls.cert_file)
        self._warn_of_grpc_clients()

    def _warn_of_grpc_clients(self) -> None:
        """An EdDSA certificate (Ed25519, Ed448) is served, but clients built on gRPC's C core refuse every handshake
        with it (their BoringSSL offers no EdDSA signature): Python's grpcio among them, so this gateway's own Python
        SDK and llmrelay command, which could not say why ("Socket closed"). Not refused: Go's and Node.js's take it."""
        block = _PEM_CERTIFICATE.search(self._in_force[0])
        if block is None:  # checked at load: not reached
            return
        key = x509.load_pem_x509_certificate(block.group()).public_key()
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            log.warning(
                "server.tls.cert_file: %s: an EdDSA certificate: clients built on gRPC's C core (Python's grpcio,"
                " so llmrelay's Python SDK and command; C++, Ruby, PHP) refuse every handshake with it (Go's and"
                " Node.js's do not); serve an EC (P-256, P-384) or RSA certificate for them",
                self._tls.cert_file,
            )

    def _keep(self) -> None:
        """The certificate in force, kept whole in `kept` for a worker started while the files cannot be used: its
        files in a directory named by their digest, which `kept/current` points to (a link replaced in one step, so a
        reader finds one certificate's files, never one's key beside another's certificate). A worker that cannot
        keep it says so and serves all the same."""
        if self._kept is None:
            return
        cert, key, client_ca = self._in_force
        digest = hashlib.sha256(b"\0".join((cert, key, client_ca or b""))).hexdigest()[:16]
        made = self._kept / digest
        try:
            self._kept.mkdir(mode=0o700, exist_ok=True)
            if not made.exists():
                making = Path(tempfile.mkdtemp(dir=self._kept))  # 0700
                for name, content in zip(_KEPT_NAMES, (cert, key, client_ca), strict=True):
                    if content is not None:
                        descriptor = os.open(making / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        with open(descriptor, "wb") as file:
                            file.write(content)
                try:
                    making.rename(made)
                except OSError:  # another worker kept the same files first
                    shutil.rmtree(making, ignore_errors=True)
            link = self._kept / f".current-{os.getpid()}"
            link.unlink(missing_ok=True)
            link.symlink_to(digest)
            link.replace(self._kept / _KEPT_CURRENT)
            # The certificates kept before, each with its private key: gone, now that no worker is to take them.
            for old in self._kept.iterdir():
                if _KEPT_DIGEST.fullmatch(old.name) and old.name != digest and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            log.warning(
                "server.tls: the certificate in force could not be kept for workers restarted while its files cannot"
                " be used (%s: %s)",
                self._kept,
                exc.strerror,
            )

    def _last_kept(self, refused: ConfigError) -> tuple[grpc.ServerCertificateConfiguration, float, _Contents] | None:
        """The certificate the workers last kept (`_keep`), when the files cannot be used (`refused` says why) and it
        still can; None otherwise."""
        if self._kept is None:
            return None
        try:
            current = (self._kept / _KEPT_CURRENT).resolve(strict=True)
        except OSError:
            return None
        cert, key, client_ca = (str(current / name) for name in _KEPT_NAMES)
        kept = TLSConfig(cert, key, client_ca if self._tls.client_ca_file else None)
        try:
            loaded = self._load(kept)
        except ConfigError:
            return None
        log.warning(
            "TLS certificate files cannot be used, so this worker serves the certificate the workers last took,"
            " until they can: %s",
            refused,
        )
        # Said once for the files as they are; and not taken as seen, so that files that become usable without
        # changing (a certificate not valid yet, whose time comes) are taken at a later check, as the running
        # workers take them.
        self._said, self._seen = (self._seen, str(refused)), ()
        return loaded

    def _load(self, tls: TLSConfig | None = None) -> tuple[grpc.ServerCertificateConfiguration, float, _Contents]:
        """Reads and checks the files (`tls`'s, else the configured ones), and tells when the certificate ends (its
        notAfter, in Unix time); gRPC itself would only find a bad one at the first handshake, failing them all.
        What does not depend on the date is checked once for each content of the files; the dates at each call.
        Messages name the field and the path, never the files' contents."""
        tls = tls or self._tls
        contents = _read_files(tls)
        if self._judged is not None and self._judged[0] == contents:
            judged = self._judged
        else:
            judged = contents, _problem_whatever_the_date(tls, contents)
        problem, not_after = judged[1], 0.0
        if problem is None:
            try:
                not_after = _check_validity(tls)
            except ConfigError as exc:
                problem = str(exc)
        # The checks read the files again: both reads must agree, or what was checked is not what gRPC would get (a
        # rotation half done: the new certificate written, the old key still there).
        if _read_files(tls) != contents:
            raise ConfigError(_CHANGED)
        self._judged = judged
        if problem is not None:
            raise ConfigError(problem)
        cert, key, client_ca = contents
        configuration = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
        return configuration, not_after, contents


def _signature(paths: tuple[Path, ...]) -> _Signature:
    found: list[tuple[int, int, int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            found.append(None)
        else:
            found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


_CHANGED = "server.tls: cert_file or key_file changed while being read; they are read again later"
_KEPT_NAMES: Final = ("cert.pem", "key.pem", "client-ca.pem")
_KEPT_CURRENT: Final = "current"
_KEPT_DIGEST: Final = re.compile(r"[0-9a-f]{16}")


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 48:
        return f"{hours / 24:.0f} days"
    if hours >= 2:
        return f"{hours:.0f} hours"
    return f"{seconds / 60:.0f} minutes"


def _read_files(tls: TLSConfig) -> _Contents:
    cert = _read(tls.cert_file, "server.tls.cert_file")
    key = _read(tls.key_file, "server.tls.key_file")
    client_ca = _read(tls.client_ca_file, "server.tls.client_ca_file") if tls.client_ca_file else None
    return cert, key, client_ca


def _problem_whatever_the_date(tls: TLSConfig, contents: _Contents) -> str | None:
    """What makes these files unusable at any date, in words (None: nothing)."""
    cert, key, client_ca = contents
    try:
        _check_certificates(cert, tls.cert_file, "server.tls.cert_file")
        if client_ca is not None and tls.client_ca_file:
            _check_authority(
                _check_certificates(client_ca, tls.client_ca_file, "server.tls.client_ca_file"), tls.client_ca_file
            )
        _check_key(tls)
        _check_served_by_grpc(tls, key, cert, client_ca)
    except ConfigError as exc:
        return str(exc)
    return None


def _check_served_by_grpc(tls: TLSConfig, key: bytes, cert: bytes, client_ca: bytes | None) -> None:
    """gRPC serves with BoringSSL, which refuses some pairs the OpenSSL of the other checks takes (an EC certificate
    whose KeyUsage lacks digitalSignature, as an RSA-minded template issues; a curve other than P-256, P-384 and
    P-521): at the start its refusal read as a port in use, and at a rotation the new certificate was taken as served
    while gRPC kept the old one. So gRPC itself loads them, on a loopback port of its own that nothing connects to,
    closed at once (a few milliseconds; gRPC logs its own lines for a refusal). A port that cannot be had at all
    (no loopback) says nothing of the certificate: then the check is left to the other ones."""
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    if _binds(credentials) or not _binds(None):
        return
    raise ConfigError(
        f"server.tls.cert_file: {shown_path(tls.cert_file)}: gRPC's TLS cannot serve it with server.tls.key_file"
        f" ({shown_path(tls.key_file)}): an EC certificate needs digitalSignature in its KeyUsage, and a curve of"
        " P-256, P-384 or P-521 (gRPC's own lines before this one say more)"
    )


def _binds(credentials: grpc.ServerCredentials | None) -> bool:
    """Whether a gRPC server takes a loopback port with these credentials (None: in plaintext)."""
    probe = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        if credentials is None:
            probe.add_insecure_port("127.0.0.1:0")
        else:
            probe.add_secure_port("127.0.0.1:0", credentials)
    except RuntimeError:
        return False
    else:
        probe.start()  # a server closes its port when stopped only once started
        return True
    finally:
        probe.stop(None).wait()


def _check_validity(tls: TLSConfig) -> float:
    """What every client would refuse in the certificate itself, whoever signed it: its dates, and a purpose other
    than a server's (a client certificate). Found by a handshake in memory with a client that trusts the
    certificate as it is; gRPC would serve it and fail every handshake. Returns its notAfter, as the client read it."""
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(tls.cert_file, tls.key_file, password=_ask_password)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False  # the names are for the clients to check: the gateway cannot know theirs
        client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the certificate itself trusted, not its issuer
        client.load_verify_locations(cafile=tls.cert_file)
        to_client, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
        accepting = server.wrap_bio(to_server, to_client, server_side=True)
        connecting = client.wrap_bio(to_client, to_server)
        for _ in range(3):  # TLS 1.3: hello, the server's flight (verified here), the client's finish
            for side in (connecting, accepting):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
        peer = connecting.getpeercert()
        not_after = peer.get("notAfter") if peer else None
        if not isinstance(not_after, str):  # the handshake did not finish: no client could take it either
            raise ConfigError(
                f"server.tls.cert_file: {shown_path(tls.cert_file)}: a TLS handshake with it did not complete"
            )
        return ssl.cert_time_to_seconds(not_after)
    except ssl.SSLCertVerificationError as exc:
        problem = f"clients would refuse its certificate: {exc.verify_message}"
        raise ConfigError(f"server.tls.cert_file: {shown_path(tls.cert_file)}: {problem}") from None
    except ssl.SSLError as exc:  # an OSError too, but no file's: no signature algorithm both sides take, say
        problem = f"a TLS handshake with it fails ({exc.reason or exc})"
        raise ConfigError(f"server.tls.cert_file: {shown_path(tls.cert_file)}: {problem}") from None
    except (_EncryptedKey, OSError):  # _check_key has just read them whole: they were being replaced
        raise ConfigError(_CHANGED) from None


def _read(path: str, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: {shown_path(path)} cannot be read ({exc.strerror})") from None


def _check_certificates(pem: bytes, path: str, where: str) -> ssl.SSLContext:
    """A context that trusts the certificates, which are PEM. The text around them, which TLS skips, need not be
    ASCII: `openssl pkcs12` writes "Bag Attributes" with a friendlyName in Latin-1 above each, and CA bundles have
    comments in UTF-8 (the whole file read as ASCII refused them as holding no certificate)."""
    store = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        blocks = _PEM_CERTIFICATE.findall(pem)
        if not blocks:
            raise ValueError("no PEM certificate")
        for block in blocks:
            store.load_verify_locations(cadata=block.decode("ascii"))
    except (ValueError, ssl.SSLError):  # DER, say, no certificate, or a broken one (not base64: not ASCII either)
        raise ConfigError(
            f"{where}: {shown_path(path)} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from None
    return store


def _check_authority(store: ssl.SSLContext, path: str) -> None:
    """A CA among the certificates the store trusts: a client's or the gateway's own certificate put there signs
    nothing, and every client would be refused."""
    if not store.cert_store_stats()["x509_ca"]:
        raise ConfigError(
            f"server.tls.client_ca_file: {shown_path(path)} holds no CA certificate (one that signs others), only"
            " certificates of a server or client; give the CA that signed the clients' certificates"
        )


class _EncryptedKey(Exception):
    pass


def _ask_password() -> bytes:
    raise _EncryptedKey


def _check_key(tls: TLSConfig) -> None:
    """The key parses and belongs to the certificate; OpenSSL checks both from the files, as gRPC will."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert_file, tls.key_file, password=_ask_password)
    except _EncryptedKey:
        raise ConfigError(
            f"server.tls.key_file: {shown_path(tls.key_file)} is encrypted; gRPC needs an unencrypted PEM key (protect"
            " the file by its permissions instead)"
        ) from None
    except ssl.SSLError as exc:
        # A key of another algorithm than the certificate's (an EC key, an RSA certificate) finds no certificate of
        # its own to go with: not the certificate's key either.
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            problem = (
                f"is not the key of the certificate in server.tls.cert_file ({shown_path(tls.cert_file)}; in a chain,"
                " the gateway's own certificate comes first)"
            )
        elif exc.reason:  # OpenSSL's name for the problem (a key too weak, say), never the key itself
            problem = f"cannot be used with server.tls.cert_file: {exc.reason}"
        else:
            problem = "holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
        raise ConfigError(f"server.tls.key_file: {shown_path(tls.key_file)} {problem}") from None
    except OSError as exc:
        raise ConfigError(f"server.tls.key_file: {shown_path(tls.key_file)} cannot be read ({exc.strerror})") from None
