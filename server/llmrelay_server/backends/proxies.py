"""Forward proxies for upstream calls, taken from the environment as curl, httpx and Go take them: HTTPS_PROXY for
https upstreams, HTTP_PROXY for http ones, ALL_PROXY for either, NO_PROXY for hosts reached directly (lower-case
names first; HTTP_PROXY is not read under CGI, where a request can set it). As Go's net/http does, a loopback
upstream (localhost, 127.0.0.0/8, ::1: a local Ollama or llama.cpp) is never proxied.

An https upstream is reached through a tunnel (CONNECT), so the proxy sees its name and nothing else; an http one
through the proxy's own request (absolute-form). Only http:// proxies: a proxy's URL with any other scheme
(https://, socks5://) stops the gateway at start rather than letting calls go around it. A proxy's user and password
(`http://user:password@proxy:3128`, percent-encoded) go to it as Basic credentials and are never shown: messages name
the proxy by its host and port alone, and an upstream's words that quote them (an error page listing the request's
headers) are redacted (`Proxy.secrets`)."""

from __future__ import annotations

import base64
import ipaddress
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from llmrelay_server.domain import immutable


@immutable
class Proxy:
    """A forward proxy that calls to one kind of upstream go through."""

    host: str
    port: int
    variable: str
    """The environment variable that named it, for messages."""
    authorization: str | None = field(default=None, repr=False)
    """The Proxy-Authorization header's value, from the URL's user and password: a secret, so not in the repr."""
    secrets: tuple[str, ...] = field(default=(), repr=False)
    """The password and the Basic credentials: taken out of the upstreams' words (`redact`). Not the user, a name
    that messages ("user", "admin") have as words of their own."""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port} ({self.variable})"


class ProxyConfigError(ValueError):
    """A proxy variable the gateway cannot follow."""


@dataclass(frozen=True)
class Proxies:
    """Which proxy, if any, a call to each upstream goes through."""

    by_scheme: dict[str, Proxy]
    """By scheme ("http", "https"): the proxy that upstreams of that scheme are reached through."""
    no_proxy: str = ""
    """NO_PROXY's value: hosts (and their subdomains), host:port, or "*" for all, reached directly."""

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every proxy's password and Basic credentials."""
        return tuple(secret for proxy in self.by_scheme.values() for secret in proxy.secrets)

    @classmethod
    def from_environment(cls) -> Proxies:
        """The proxies the environment names (none when it names none); ProxyConfigError for one that is not
        http://."""
        found = urllib.request.getproxies_environment()
        by_scheme = {}
        for scheme in ("http", "https"):
            if url := found.get(scheme) or found.get("all"):
                variable = f"{scheme if found.get(scheme) else 'all'}_proxy".upper()
                by_scheme[scheme] = _proxy(url, variable)
        return cls(by_scheme, found.get("no", ""))

    def for_url(self, url: str) -> Proxy | None:
        """The proxy a call to `url` goes through, or None to go directly."""
        parts = urllib.parse.urlsplit(url)
        proxy = self.by_scheme.get(parts.scheme)
        host = (parts.hostname or "").lower()
        if proxy is None or _loopback(host):
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return None if _bypassed(self.no_proxy, host, port) else proxy


NO_PROXIES = Proxies({})


def _proxy(url: str, variable: str) -> Proxy:
    # "proxy:3128" without a scheme means http://, as curl reads it.
    url = url if "://" in url else f"http://{url}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.hostname  # noqa: B018 - read for its ValueError: an address in brackets that is none
    except ValueError:
        # Not the value, nor urllib's words, which quote it: its credentials with it.
        raise ProxyConfigError(f"{variable}: not a proxy URL (its host or port cannot be read)") from None
    if "@" in url.partition("://")[2] and "@" not in parts.netloc:
        # A user or password with a "/", "?" or "#" of its own ends the URL's authority there, as every client reads
        # it: the rest of the password would be taken for the proxy's host and port, and shown in every message.
        raise ProxyConfigError(
            f"{variable}: the proxy's user or password holds a character that ends a URL's host part: percent-encode"
            " it (/ as %2F, ? as %3F, # as %23, @ as %40, : as %3A, % as %25)"
        )
    if parts.scheme != "http" or not parts.hostname:
        shown = f"{parts.scheme}://{parts.hostname or ''}"
        raise ProxyConfigError(
            f"{variable}: {shown}... is not an http:// proxy; the gateway reaches upstreams through http:// proxies"
            " only (unset it, or add the upstream's host to NO_PROXY, to go directly)"
        )
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ProxyConfigError(f"{variable}: the proxy's port is not a number from 0 to 65535") from exc
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        try:
            credentials = f"{user}:{password}".encode()
        except UnicodeEncodeError:  # bytes of the environment that are no UTF-8 (Python's surrogate escapes)
            raise ProxyConfigError(f"{variable}: the proxy's user or password is not UTF-8 text") from None
        token = base64.b64encode(credentials).decode("ascii")
        authorization = f"Basic {token}"
        return Proxy(parts.hostname, port, variable, authorization, tuple(filter(None, (password, token))))
    return Proxy(parts.hostname, port, variable)


def _bypassed(no_proxy: str, host: str, port: int) -> bool:
    """Whether NO_PROXY names `host`: "*"; the host, or a domain it is in ("example.com", ".example.com",
    "*.example.com"); its address, or a network holding it ("10.0.0.0/8"); any of them with ":PORT" for that port
    alone."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 or entry.startswith("[") else ("", "", "")
        if not name or not entry_port.isdigit():  # no port, or an IPv6 address whose colons are its own
            name, entry_port = entry, ""
        if not name or (entry_port and int(entry_port) != port):
            continue
        name = name.strip("[]")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = name.removeprefix("*").removeprefix(".")
        if host == domain or host.endswith(f".{domain}"):
            return True
    return False


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
