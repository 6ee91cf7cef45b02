"""How a client makes its channel: the TLS rule (a table), the credentials from the TLS arguments, and the default
service config with its retry policy."""

from __future__ import annotations

import json

import grpc
import pytest
from llmrelay import DEFAULT_SERVICE_CONFIG, Client, is_loopback_target, uses_tls
from llmrelay._channel import SERVICE_CONFIG_OPTION, ChannelSettings

LOOPBACK = [
    "127.0.0.1:50051",
    "127.9.8.7:1",
    "127.0.0.1",
    "localhost:50051",
    "localhost",
    "LOCALHOST:50051",
    "localhost.:50051",
    "[::1]:50051",
    "::1",
    "dns:///localhost:50051",
    "dns:///127.0.0.1:50051",
    "dns://8.8.8.8/localhost:50051",
    "dns:localhost:50051",
    "ipv4:127.0.0.1:50051",
    "ipv6:[::1]:50051",
    "ipv4:127.0.0.1:1,127.0.0.2:2",
    "passthrough:///localhost:50051",
    "unix:/run/llmrelay.sock",
    "unix:///run/llmrelay.sock",
    "unix-abstract:llmrelay",
]
REMOTE = [
    "llm.example.com:443",
    "llm.example.com",
    "dns:///llm.example.com:443",
    "10.0.0.5:50051",
    "0.0.0.0:50051",
    "[2001:db8::1]:443",
    "localhost.example.com:443",
    "ipv4:10.0.0.1:1,127.0.0.1:2",
    "xds:///llmrelay",
    "xds:///localhost:50051",
    "passthrough:///llm.example.com:443",
    "128.0.0.1:50051",
]


@pytest.mark.parametrize("target", LOOPBACK)
def test_loopback_targets_are_plaintext_by_default(target: str) -> None:
    assert is_loopback_target(target)
    assert not uses_tls(target, None)
    assert uses_tls(target, True), "tls=True asks for TLS even on loopback"


@pytest.mark.parametrize("target", REMOTE)
def test_other_targets_use_tls_by_default(target: str) -> None:
    assert not is_loopback_target(target)
    assert uses_tls(target, None)
    assert not uses_tls(target, False), "tls=False asks for plaintext anywhere"


def test_certificates_mean_tls_and_contradictions_are_refused() -> None:
    assert ChannelSettings().credentials_for("127.0.0.1:1") is None
    assert ChannelSettings().credentials_for("llm.example.com:443") is not None
    assert ChannelSettings(root_certificates=b"PEM").credentials_for("127.0.0.1:1") is not None
    own = grpc.ssl_channel_credentials()
    assert ChannelSettings(credentials=own).credentials_for("127.0.0.1:1") is own
    with pytest.raises(ValueError, match="tls=False with certificates"):
        ChannelSettings(tls=False, root_certificates=b"PEM").credentials_for("llm.example.com:443")
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        ChannelSettings(private_key=b"KEY").credentials_for("llm.example.com:443")
    with pytest.raises(ValueError, match="either credentials or the certificates"):
        ChannelSettings(credentials=own, root_certificates=b"PEM").credentials_for("llm.example.com:443")


def test_the_client_decides_by_the_rule() -> None:
    with Client("127.0.0.1:1") as local, Client("llm.example.com:443") as remote, Client("h:1", tls=False) as forced:
        assert (local.uses_tls, remote.uses_tls, forced.uses_tls) == (False, True, False)


def test_the_channel_gets_the_retry_policy_by_default() -> None:
    with Client("127.0.0.1:1") as client:
        options = dict(client.channel_options)
    config = json.loads(options[SERVICE_CONFIG_OPTION])
    assert options[SERVICE_CONFIG_OPTION] == DEFAULT_SERVICE_CONFIG
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "llmrelay.v1.LLMService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 1 < method["retryPolicy"]["maxAttempts"] <= 5


def test_the_service_config_can_be_replaced_or_left_out_and_options_pass_through() -> None:
    mine = {"methodConfig": [{"name": [{}], "timeout": "1s"}]}
    with Client("127.0.0.1:1", service_config=mine, options=[("grpc.max_receive_message_length", 1)]) as client:
        assert dict(client.channel_options) == {
            SERVICE_CONFIG_OPTION: json.dumps(mine),
            "grpc.max_receive_message_length": 1,
        }
    with Client("127.0.0.1:1", service_config=None) as client:
        assert client.channel_options == []
    with Client("127.0.0.1:1", options=[(SERVICE_CONFIG_OPTION, "{}")]) as client:
        assert dict(client.channel_options) == {SERVICE_CONFIG_OPTION: "{}"}, "the caller's options win"


def test_a_channel_of_ones_own_takes_no_channel_arguments() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="channel= is a channel"):
        Client(channel=channel, tls=True)
