"""Certificates for the TLS tests, made on the spot with `cryptography`: certificate authorities, and the server and
client certificates they sign."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# P-256: a key in a millisecond, where RSA takes tens.
_CURVE = ec.SECP256R1()
_SKEW = datetime.timedelta(minutes=5)
"""How long before now a certificate is valid from: a clock a little behind still accepts it."""
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, in PEM."""

    cert: bytes
    key: bytes

    def write(self, cert_file: Path, key_file: Path) -> None:
        cert_file.write_bytes(self.cert)
        key_file.write_bytes(self.key)


KEY_ENCIPHERMENT_ONLY = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
"""An RSA-minded template's KeyUsage: an EC certificate with it is one OpenSSL takes and gRPC's BoringSSL refuses."""


class Authority:
    """A self-signed CA that issues server certificates for localhost / 127.0.0.1 and client certificates."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(_CURVE)
        self._name = _name(name)
        ca = _builder(self._name, self._name, self._key.public_key())
        ca = ca.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        ca = ca.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        self.cert = ca.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def server(
        self,
        *more_names: str,
        valid_from: datetime.timedelta = -_SKEW,
        valid_for: datetime.timedelta = _DAY,
        curve: ec.EllipticCurve | None = _CURVE,
        key_usage: x509.KeyUsage | None = None,
    ) -> Issued:
        """For localhost, 127.0.0.1 and `more_names` (host names); valid from `valid_from` from now (negative: ago),
        for `valid_for`; its key on `curve` (None: an Ed25519 key), with `key_usage` when given."""
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in ("localhost", *more_names)]
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        return self._issue(
            "llmrelay test server", ExtendedKeyUsageOID.SERVER_AUTH, names, valid_from, valid_for, curve, key_usage
        )

    def server_context(self, folder: Path, *more_names: str) -> ssl.SSLContext:
        """A server's TLS context, with a certificate of this authority's for localhost, 127.0.0.1 and `more_names`
        (its files written in `folder`)."""
        self.server(*more_names).write(folder / "server.pem", folder / "server.key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(folder / "server.pem", folder / "server.key")
        return context

    def client(self, name: str = "llmrelay test client") -> Issued:
        return self._issue(name, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("client.test")])

    def _issue(
        self,
        name: str,
        usage: x509.ObjectIdentifier,
        names: list[x509.GeneralName],
        valid_from: datetime.timedelta = -_SKEW,
        valid_for: datetime.timedelta = _DAY,
        curve: ec.EllipticCurve | None = _CURVE,
        key_usage: x509.KeyUsage | None = None,
    ) -> Issued:
        key = ed25519.Ed25519PrivateKey.generate() if curve is None else ec.generate_private_key(curve)
        cert = _builder(_name(name), self._name, key.public_key(), valid_from, valid_for)
        cert = cert.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        cert = cert.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = cert.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if key_usage is not None:
            cert = cert.add_extension(key_usage, critical=True)
        pem = cert.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        encoded = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(pem, encoded)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    valid_from: datetime.timedelta = -_SKEW,
    valid_for: datetime.timedelta = _DAY,
) -> x509.CertificateBuilder:
    start = datetime.datetime.now(datetime.UTC) + valid_from
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
    )
