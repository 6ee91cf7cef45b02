"""Which proxy an upstream call goes through, as the environment says (backends/proxies.py): pure logic; the calls
themselves through a real proxy are in test_http1.py and tests/e2e/test_proxy.py."""

from __future__ import annotations

import base64

import pytest
from harness import PROXY_VARIABLES
from llmrelay_server.backends.proxies import Proxies, Proxy, ProxyConfigError


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)


def test_none_named_none_used() -> None:
    proxies = Proxies.from_environment()
    assert proxies.for_url("https://api.openai.com/v1") is None
    assert proxies.for_url("http://vllm.internal:8000/v1") is None


def test_https_and_http_upstreams_each_take_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://me:p%40ss@proxy.corp:3128")
    monkeypatch.setenv("http_proxy", "plain.corp:8080")  # no scheme: http://, as curl reads it
    proxies = Proxies.from_environment()
    secure = proxies.for_url("https://api.openai.com/v1")
    token = base64.b64encode(b"me:p@ss").decode()
    assert secure == Proxy("proxy.corp", 3128, "HTTPS_PROXY", f"Basic {token}", ("p@ss", token))
    assert "p@ss" not in repr(secure) and "Basic" not in repr(secure) and "me:" not in str(secure)
    assert str(secure) == "http://proxy.corp:3128 (HTTPS_PROXY)"
    assert proxies.for_url("http://vllm.internal:8000/v1") == Proxy("plain.corp", 8080, "HTTP_PROXY")


def test_all_proxy_covers_both_and_lower_case_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "http://upper.corp:1")
    monkeypatch.setenv("all_proxy", "http://lower.corp:2")
    proxies = Proxies.from_environment()
    assert proxies.for_url("https://api.anthropic.com") == Proxy("lower.corp", 2, "ALL_PROXY")
    assert proxies.for_url("http://vllm.internal/v1") == Proxy("lower.corp", 2, "ALL_PROXY")


def test_http_proxy_is_not_read_under_cgi(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CGI request sets HTTP_PROXY from its Proxy header (httpoxy): under CGI it means nothing."""
    monkeypatch.setenv("REQUEST_METHOD", "GET")
    monkeypatch.setenv("HTTP_PROXY", "http://attacker:1")
    assert Proxies.from_environment().for_url("http://vllm.internal/v1") is None


@pytest.mark.parametrize(
    "host", ["localhost", "ollama.localhost", "127.0.0.1", "127.1.2.3", "[::1]"], ids=lambda host: host
)
def test_a_loopback_upstream_is_never_proxied(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    assert Proxies.from_environment().for_url(f"http://{host}:11434/v1") is None


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("*", "https://api.openai.com/v1", True),
        ("internal.example", "https://internal.example/v1", True),
        ("internal.example", "https://vllm.internal.example/v1", True),
        (".internal.example", "https://internal.example/v1", True),
        ("*.internal.example", "https://a.internal.example/v1", True),
        ("internal.example", "https://notinternal.example/v1", False),
        ("api.openai.com:8443", "https://api.openai.com/v1", False),
        ("api.openai.com:443", "https://API.OpenAI.com/v1", True),
        ("10.0.0.0/8, 192.168.1.7", "http://10.20.30.40:8000/v1", True),
        ("10.0.0.0/8, 192.168.1.7", "http://192.168.1.8:8000/v1", False),
        ("fd00::/8", "http://[fd00::1]:8000/v1", True),
        ("[fd00::1]:8000", "http://[fd00::1]:8000/v1", True),
        ("", "https://api.openai.com/v1", False),
    ],
)
def test_no_proxy(monkeypatch: pytest.MonkeyPatch, no_proxy: str, url: str, direct: bool) -> None:
    monkeypatch.setenv("ALL_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert (Proxies.from_environment().for_url(url) is None) is direct


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("socks5://me:secret@proxy.corp:1080", "socks5://proxy.corp... is not an http:// proxy"),
        ("https://proxy.corp:443", "https://proxy.corp... is not an http:// proxy"),
        ("http://proxy.corp:99999", "the proxy's port is not a number"),
        # urllib's own ValueErrors, which quote the value (its password): a traceback at start, the secret in it
        ("http://[::1", "not a proxy URL (its host or port cannot be read)"),
        ("http://me:secret\u2100x@proxy.corp:3128", "not a proxy URL"),
        ("http://me:secret@[zz]:3128", "not a proxy URL"),
        ("http://me:secret\udcffx@proxy.corp:3128", "user or password is not UTF-8"),
        # A "/", "?" or "#" of the password's own ends the URL's host part: the password's start was taken for the
        # proxy's host and port (shown in every status), or its port refused as not a number.
        ("http://me:2024/secret@proxy.corp:3128", "percent-encode it (/ as %2F"),
        ("http://me:se#cret@proxy.corp:3128", "percent-encode it"),
        ("me:se?cret@proxy.corp:3128", "percent-encode it"),
    ],
)
def test_a_proxy_the_gateway_cannot_use_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str, said: str
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", value)
    with pytest.raises(ProxyConfigError, match="HTTPS_PROXY: ") as refused:
        Proxies.from_environment()
    assert said in str(refused.value) and "secret" not in str(refused.value)
