"""How a client makes its channel: the TLS rule (a table), the credentials from the TLS arguments, and the default
service config with its retry policy."""

from __future__ import annotations

import json

import grpc
import pytest
from certs import Authority
from llmrelay import BLOCKING_SERVICE_CONFIG, DEFAULT_SERVICE_CONFIG, AsyncClient, Client, is_loopback_target, uses_tls
from llmrelay._channel import SERVICE_CONFIG_OPTION, ChannelSettings

# The transport rule's table, the same rows as the Go SDK's (client/go/llmrelay/transport_test.go) and the TypeScript
# SDK's (client/node/test/tls.test.ts): change the three together. A host is loopback when the language's strict
# parser reads it as an address in 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104 (any spelling), or when it is
# "localhost"; anything the parser refuses (leading zeros, 127.1, hex) is a name, and gets TLS.
TARGETS = [
    ("127.0.0.1:50051", True),
    ("127.0.0.1", True),
    ("127.45.6.7:443", True),  # all of 127.0.0.0/8
    ("127.255.255.255:1", True),
    ("localhost:50051", True),
    ("LocalHost:50051", True),
    ("localhost", True),
    ("localhost.:50051", True),
    ("[::1]:50051", True),
    ("::1", True),
    ("[0::1]:50051", True),
    ("[0:0:0:0:0:0:0:1]:50051", True),
    ("[::0001]:50051", True),
    ("[::1%lo]:50051", True),
    ("[::ffff:127.0.0.1]:50051", True),  # IPv4-mapped 127.0.0.1, in every spelling
    ("[::ffff:7f00:1]:50051", True),
    ("[::FFFF:127.1.2.3]:50051", True),
    ("[0:0:0:0:0:ffff:7f00:1]:50051", True),
    ("::ffff:127.0.0.1", True),
    ("dns:///localhost:50051", True),
    ("dns:///127.0.0.1:50051", True),
    ("dns:localhost:50051", True),
    ("dns://8.8.8.8/localhost:50051", True),  # the authority is the DNS server, not the gateway
    ("DNS:///[::1]:50051", True),
    ("dns:///[::ffff:127.0.0.1]:50051", True),
    ("passthrough:///127.0.0.1:50051", True),
    ("passthrough:///localhost:50051", True),
    ("ipv4:127.0.0.1:50051,127.0.0.2:50052", True),
    ("ipv6:[::1]:50051", True),
    ("ipv6:[::ffff:7f00:1]:50051", True),
    ("unix:/run/llmrelay.sock", True),
    ("unix:///run/llmrelay.sock", True),
    ("unix-abstract:llmrelay", True),
    ("127.000.000.001:50051", False),  # leading zeros: not an address to the strict parsers, so a name
    ("127.1:50051", False),
    ("0x7f.0.0.1:50051", False),
    ("0177.0.0.1:50051", False),
    ("127.0.0.256:50051", False),
    ("[::ffff:128.0.0.1]:50051", False),
    ("[::127.0.0.1]:50051", False),  # IPv4-compatible, not IPv4-mapped
    ("[::ffff:0:127.0.0.1]:50051", False),  # IPv4-translated, not IPv4-mapped
    ("[::2]:50051", False),
    ("[::]:50051", False),
    ("[fe80::1%eth0]:50051", False),
    ("0.0.0.0:50051", False),
    ("10.0.0.5:50051", False),
    ("128.0.0.1:50051", False),
    ("[2001:db8::1]:50051", False),
    ("gateway.example.com:443", False),
    ("gateway.example.com", False),
    ("localhost.example.com:50051", False),
    ("127.0.0.1.example.com:50051", False),
    ("localhost..:50051", False),
    ("dns:///gateway.example.com:443", False),
    ("dns://127.0.0.1/gateway.example.com:443", False),  # a local DNS server, a remote gateway
    ("dns://8.8.8.8", False),  # no endpoint
    ("passthrough:///gateway.example.com:443", False),
    ("ipv4:127.0.0.1:50051,10.0.0.1:50051", False),  # one address leaves the machine
    ("xds:///llmrelay", False),
    ("xds:///localhost:50051", False),  # another resolver's scheme: who knows where it resolves
    ("unix:1234", True),  # a socket named by digits, not a host and port
    ("localhost:http", True),  # a port by its service's name
    ("localhost:", True),  # an empty port
    (" 127.0.0.1:50051", False),  # not trimmed: a name
    ("", False),
]


@pytest.mark.parametrize(("target", "loopback"), TARGETS)
def test_loopback_targets_alone_are_plaintext_by_default(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback
    assert uses_tls(target, None) is not loopback
    assert uses_tls(target, True), "tls=True asks for TLS even on loopback"
    assert not uses_tls(target, False), "tls=False asks for plaintext anywhere"


def test_certificates_mean_tls_and_contradictions_are_refused() -> None:
    assert ChannelSettings().credentials_for("127.0.0.1:1") is None
    assert ChannelSettings().credentials_for("llm.example.com:443") is not None
    roots = Authority("llmrelay channel test CA").cert
    assert ChannelSettings(root_certificates=roots).credentials_for("127.0.0.1:1") is not None
    own = grpc.ssl_channel_credentials()
    assert ChannelSettings(credentials=own).credentials_for("127.0.0.1:1") is own
    with pytest.raises(ValueError, match="tls=False with certificates"):
        ChannelSettings(tls=False, root_certificates=b"PEM").credentials_for("llm.example.com:443")
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        ChannelSettings(private_key=b"KEY").credentials_for("llm.example.com:443")
    with pytest.raises(ValueError, match="either credentials or the certificates"):
        ChannelSettings(credentials=own, root_certificates=b"PEM").credentials_for("llm.example.com:443")


@pytest.mark.parametrize("target", ["http://127.0.0.1:50051", "HTTPS://user:secret@llm.example.com"])
def test_a_url_for_a_target_is_refused_unechoed(target: str) -> None:
    """Resolved as a host name, it failed every call "Misformatted domain name", with a hint to try TLS or not."""
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match=r"^target: a gRPC target is HOST:PORT") as caught:
            make(target)
        assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:102775", "[::1]:70000", "dns:///gw.example:65536", "dns://8.8.8.8/gw.example:99999",
     "ipv4:127.0.0.1:50051,127.0.0.1:70000"],
)  # fmt: skip
def test_a_port_past_65535_is_refused(target: str) -> None:
    """gRPC's core takes it modulo 65536: 127.0.0.1:102775 connected to port 37239, a server of another's, and the
    caller's key went with each call."""
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match=r"^target: its port is not a number from 0 to 65535$"):
            make(target)


@pytest.mark.parametrize(
    "target", ["127.0.0.1:65535", "[::1]:50051", "dns:///gw.example:443", "unix:/run/llmrelay:70000", "::1", "gw"]
)
def test_a_target_whose_ports_are_in_range_or_has_none_is_taken(target: str) -> None:
    with Client(target, tls=False) as client:
        assert client.target == target


def test_the_client_decides_by_the_rule() -> None:
    with Client("127.0.0.1:1") as local, Client("llm.example.com:443") as remote, Client("h:1", tls=False) as forced:
        assert (local.uses_tls, remote.uses_tls, forced.uses_tls) == (False, True, False)


def test_the_channel_gets_the_retry_policy_by_default_but_a_blocking_one_for_its_streams() -> None:
    with Client("127.0.0.1:1") as client:
        options = dict(client.channel_options)
    async_options = dict(AsyncClient("127.0.0.1:1").channel_options)  # its channel made at its first call
    assert async_options[SERVICE_CONFIG_OPTION] == DEFAULT_SERVICE_CONFIG
    assert options[SERVICE_CONFIG_OPTION] == BLOCKING_SERVICE_CONFIG
    (method,) = json.loads(DEFAULT_SERVICE_CONFIG)["methodConfig"]
    assert method["name"] == [{"service": "llmrelay.v1.LLMService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 1 < method["retryPolicy"]["maxAttempts"] <= 5
    service, streams = json.loads(BLOCKING_SERVICE_CONFIG)["methodConfig"]
    assert service == method
    assert streams == {"name": [{"service": "llmrelay.v1.LLMService", "method": "StreamComplete"}]}


def test_the_service_config_can_be_replaced_or_left_out_and_options_pass_through() -> None:
    mine = {"methodConfig": [{"name": [{}], "timeout": "1s"}]}
    with Client("127.0.0.1:1", service_config=mine, options=[("grpc.max_receive_message_length", 1)]) as client:
        assert dict(client.channel_options) == {
            SERVICE_CONFIG_OPTION: json.dumps(mine),
            "grpc.max_receive_message_length": 1,
        }
    # Answers of any size unless the caller says otherwise: the gateway bounds them.
    with Client("127.0.0.1:1", service_config=None) as client:
        assert client.channel_options == [("grpc.max_receive_message_length", -1)]
    with Client("127.0.0.1:1", options=[(SERVICE_CONFIG_OPTION, "{}")]) as client:
        assert dict(client.channel_options) == {
            "grpc.max_receive_message_length": -1,
            SERVICE_CONFIG_OPTION: "{}",
        }, "the caller's options win"


def test_a_channel_of_ones_own_takes_no_channel_arguments() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="channel= is a channel"):
        Client(channel=channel, tls=True)
