"""load_config: defaults, file, environment (each overriding the one before), interpolation, and every ConfigError."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from certs import Authority
from llmrelay_server import app, config
from llmrelay_server.backends import provider_factory
from llmrelay_server.config import ConfigError, load_config
from llmrelay_server.domain import BackendSpec
from llmrelay_server.tokens import TokenCounter


def load(tmp_path: Path, yaml_text: str | None, env: dict[str, str] | None = None) -> config.GatewayConfig:
    """load_config over an isolated environment (never os.environ) and, when given, a YAML file."""
    path = None
    if yaml_text is not None:
        path = tmp_path / "llmrelay.yaml"
        path.write_text(yaml_text)
    return load_config(env or {}, path)


# --- defaults ---------------------------------------------------------------------------------------------------


def test_defaults_without_key_are_ollama_alone(tmp_path: Path) -> None:
    cfg = load(tmp_path, None)

    assert cfg.server == config.ServerConfig()
    assert cfg.server.listen == "127.0.0.1:50051"
    assert cfg.router == config.RouterConfig()
    assert cfg.aliases == {}
    assert cfg.backends == (
        BackendSpec(name="ollama", kind="ollama", base_url="http://localhost:11434/v1", default_model="gpt-oss:20b"),
    )


def test_defaults_with_key_put_openai_first(tmp_path: Path) -> None:
    cfg = load(tmp_path, None, {"OPENAI_API_KEY": "sk-test"})

    assert [b.name for b in cfg.backends] == ["openai", "ollama"]
    openai = cfg.backends[0]
    assert (openai.kind, openai.base_url, openai.default_model, openai.api_key) == (
        "openai",
        "https://api.openai.com/v1",
        "gpt-4o",
        "sk-test",
    )
    assert cfg.backends[1].api_key is None


def test_an_anthropic_key_puts_anthropic_after_openai(tmp_path: Path) -> None:
    cfg = load(tmp_path, None, {"ANTHROPIC_API_KEY": "sk-ant", "OPENAI_API_KEY": "sk-test"})
    assert [b.name for b in cfg.backends] == ["openai", "anthropic", "ollama"]
    anthropic = cfg.backends[1]
    assert (anthropic.kind, anthropic.base_url, anthropic.default_model, anthropic.api_key) == (
        "anthropic",
        "https://api.anthropic.com",
        "claude-sonnet-5",
        "sk-ant",
    )
    assert anthropic.default_max_tokens is None, "the backend's own default applies"
    assert [b.name for b in load(tmp_path, None, {"ANTHROPIC_API_KEY": "sk-ant"}).backends] == ["anthropic", "ollama"]


def test_the_anthropic_section_and_its_environment(tmp_path: Path) -> None:
    text = 'llm:\n  anthropic: {api_key: "${ANTHROPIC_API_KEY}", base_url: "http://file", model: f, max_tokens: 8192}\n'
    spec = load(tmp_path, text, {"ANTHROPIC_API_KEY": "k"}).backends[0]
    assert (spec.name, spec.base_url, spec.default_model, spec.default_max_tokens) == (
        "anthropic",
        "http://file",
        "f",
        8192,
    )
    env = {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://env/", "LLMRELAY_ANTHROPIC_MODEL": "e"}
    spec = load(tmp_path, text, env).backends[0]
    assert (spec.base_url, spec.default_model, spec.api_key) == ("http://env", "e", "k")
    # Without a key the section configures no backend, as OpenAI's does not.
    assert [b.name for b in load(tmp_path, text).backends] == ["ollama"]


def test_an_anthropic_backend_among_the_extras(tmp_path: Path) -> None:
    extra = "{name: claude, kind: anthropic, base_url: 'http://proxy', model: c, api_key: k, max_tokens: 50}"
    spec = load(tmp_path, f"llm:\n  backends: [{extra}]\n").backends[1]
    assert (spec.name, spec.kind, spec.default_max_tokens, spec.api_key) == ("claude", "anthropic", 50, "k")


def test_an_empty_key_counts_as_no_key(tmp_path: Path) -> None:
    assert [b.name for b in load(tmp_path, None, {"OPENAI_API_KEY": ""}).backends] == ["ollama"]


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ("openai: {api_key: '${OPENAI_API_KEY:-}', base_url: 'not a url'}", "llm.openai.base_url"),
        ("openai: {context_window: -1}", "llm.openai.context_window"),
        ("anthropic: {base_url: 'ftp://x'}", "llm.anthropic.base_url"),
        ('anthropic: {models: ["a\\nb"]}', "llm.anthropic.models[0]"),
    ],
)
def test_a_section_without_its_key_is_checked_all_the_same(tmp_path: Path, section: str, where: str) -> None:
    """Checked only with its key: the file started wherever the key was unset (staging) and stopped the gateway
    wherever it was set (production)."""
    with pytest.raises(ConfigError, match=re.escape(where)):
        load(tmp_path, f"llm:\n  {section}\n")


def test_the_variables_of_a_backend_without_its_key_are_not_read(tmp_path: Path) -> None:
    """Other tools share them: OPENAI_BASE_URL set for one of them stops no gateway that has no OpenAI backend."""
    env = {"OPENAI_BASE_URL": "not a url", "ANTHROPIC_BASE_URL": "", "LLMRELAY_ANTHROPIC_MODEL": "a\nb"}
    assert [b.name for b in load(tmp_path, None, env).backends] == ["ollama"]


def test_a_key_in_the_file_enables_openai(tmp_path: Path) -> None:
    cfg = load(tmp_path, "llm:\n  openai:\n    api_key: sk-file\n")
    assert [(b.name, b.api_key) for b in cfg.backends] == [("openai", "sk-file"), ("ollama", None)]


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "") == load(tmp_path, None)
    assert load(tmp_path, "# only a comment\n") == load(tmp_path, None)


def test_the_file_path_comes_from_llmrelay_config_when_not_given(tmp_path: Path) -> None:
    path = tmp_path / "from-env.yaml"
    path.write_text("server:\n  listen: 0.0.0.0:7000\n")

    assert load_config({"LLMRELAY_CONFIG": str(path)}, None).server.listen == "0.0.0.0:7000"


def test_file_values_override_defaults(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
server:
  listen: "[::1]:6000"
  drain_s: 0
  grace_period_s: 3
  max_message_bytes: 1024
  usage_db: ":memory:"
  health_interval_s: 0.5
router:
  request_timeout_s: 12
  first_chunk_timeout_s: 4
  stream_idle_timeout_s: 7.5
  retry: {max_retries: 0, initial_backoff_s: 0.01, max_backoff_s: 0.5, max_retry_after_s: 3}
  circuit: {failure_threshold: 2, cooldown_s: 1}
""",
    )

    assert cfg.server == config.ServerConfig(
        listen="[::1]:6000",
        drain_s=0.0,
        grace_period_s=3.0,
        max_message_bytes=1024,
        usage_db=":memory:",
        health_interval_s=0.5,
    )
    assert cfg.router == config.RouterConfig(
        retry=config.RetryConfig(max_retries=0, initial_backoff_s=0.01, max_backoff_s=0.5, max_retry_after_s=3.0),
        circuit=config.CircuitConfig(failure_threshold=2, cooldown_s=1.0),
        request_timeout_s=12.0,
        first_chunk_timeout_s=4.0,
        stream_idle_timeout_s=7.5,
    )
    assert isinstance(cfg.server.grace_period_s, float)  # a YAML int for a float field becomes a float


# --- environment over file over defaults ---------------------------------------------------------------------------

FILE_WITH_EVERYTHING = """
server:
  listen: 10.0.0.1:1111
  usage_db: /file/usage.db
llm:
  openai:
    api_key: sk-file
    base_url: http://file-openai:1/v1
    model: file-gpt
  ollama:
    base_url: http://file-ollama:2/v1
    model: file-llama
"""


def _openai(cfg: config.GatewayConfig) -> BackendSpec:
    return next(b for b in cfg.backends if b.name == "openai")


def _ollama(cfg: config.GatewayConfig) -> BackendSpec:
    return next(b for b in cfg.backends if b.name == "ollama")


@pytest.mark.parametrize(
    ("variable", "env_value", "read", "default", "from_file", "from_env"),
    [
        (
            "OPENAI_BASE_URL",
            "http://env-openai:3/v1/",
            lambda c: _openai(c).base_url,
            "https://api.openai.com/v1",
            "http://file-openai:1/v1",
            "http://env-openai:3/v1",
        ),
        (
            "OLLAMA_HOST",
            "env-ollama:4",
            lambda c: _ollama(c).base_url,
            "http://localhost:11434/v1",
            "http://file-ollama:2/v1",
            "http://env-ollama:4/v1",
        ),
        (
            "LLMRELAY_OPENAI_MODEL",
            "env-gpt",
            lambda c: _openai(c).default_model,
            "gpt-4o",
            "file-gpt",
            "env-gpt",
        ),
        (
            "LLMRELAY_OLLAMA_MODEL",
            "env-llama",
            lambda c: _ollama(c).default_model,
            "gpt-oss:20b",
            "file-llama",
            "env-llama",
        ),
        (
            "LLMRELAY_LISTEN",
            "127.0.0.2:2222",
            lambda c: c.server.listen,
            "127.0.0.1:50051",
            "10.0.0.1:1111",
            "127.0.0.2:2222",
        ),
        (
            "LLMRELAY_USAGE_DB",
            "/env/usage.db",
            lambda c: c.server.usage_db,
            "llmrelay-usage.db",
            "/file/usage.db",
            "/env/usage.db",
        ),
        (
            "OPENAI_API_KEY",
            "sk-env",
            lambda c: _openai(c).api_key,
            None,  # no key anywhere: no OpenAI backend at all (checked below)
            "sk-file",
            "sk-env",
        ),
    ],
)
def test_env_overrides_file_overrides_default(
    tmp_path: Path,
    variable: str,
    env_value: str,
    read: Callable[[config.GatewayConfig], object],
    default: object,
    from_file: object,
    from_env: object,
) -> None:
    base_env = {} if variable == "OPENAI_API_KEY" else {"OPENAI_API_KEY": "sk-base"}
    if default is not None:
        assert read(load(tmp_path, None, base_env)) == default
    else:
        assert "openai" not in [b.name for b in load(tmp_path, None, base_env).backends]
    assert read(load(tmp_path, FILE_WITH_EVERYTHING)) == from_file  # the file carries its own key
    assert read(load(tmp_path, FILE_WITH_EVERYTHING, {variable: env_value})) == from_env


def test_an_empty_env_variable_does_not_override_the_file(tmp_path: Path) -> None:
    env = {"LLMRELAY_LISTEN": "", "LLMRELAY_OLLAMA_MODEL": "", "OLLAMA_HOST": "", "OPENAI_BASE_URL": ""}
    cfg = load(tmp_path, FILE_WITH_EVERYTHING, env)

    assert cfg.server.listen == "10.0.0.1:1111"
    assert _ollama(cfg).default_model == "file-llama"
    assert _ollama(cfg).base_url == "http://file-ollama:2/v1"
    assert _openai(cfg).base_url == "http://file-openai:1/v1"


def test_base_urls_lose_their_trailing_slash(tmp_path: Path) -> None:
    cfg = load(tmp_path, "llm:\n  ollama:\n    base_url: http://box:11434/v1///\n")
    assert _ollama(cfg).base_url == "http://box:11434/v1"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("llm:\n  ollama:\n    base_url: http://box:11434\n", "http://box:11434/v1"),
        ("llm:\n  ollama:\n    base_url: http://box:11434/\n", "http://box:11434/v1"),
        ("llm:\n  ollama:\n    base_url: https://proxy/ollama/v1\n", "https://proxy/ollama/v1"),
        (
            "llm:\n  backends: [{name: box, kind: ollama, base_url: 'http://box:11434', model: m}]\n",
            "http://box:11434/v1",
        ),
        (
            "llm:\n  backends: [{name: box, kind: llamacpp, base_url: 'http://box:8080', model: m}]\n",
            "http://box:8080",
        ),
    ],
    ids=["ollama root", "ollama root slash", "ollama path kept", "ollama extra", "other kinds as written"],
)
def test_an_ollama_base_url_of_its_root_is_its_openai_api(tmp_path: Path, yaml_text: str, expected: str) -> None:
    """Ollama's address as OLLAMA_HOST and Ollama's docs write it: its probes (/api/...) passed and every call was a
    404, MODEL_NOT_FOUND for the very model Health listed."""
    name = "box" if "backends:" in yaml_text else "ollama"
    assert [spec.base_url for spec in load(tmp_path, yaml_text).backends if spec.name == name] == [expected]


# --- interpolation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("${MODEL}", {"MODEL": "from-env"}, "from-env"),
        ("${MODEL:-fallback}", {"MODEL": "from-env"}, "from-env"),
        ("${MODEL:-fallback}", {}, "fallback"),
        ("${MODEL:-fallback}", {"MODEL": ""}, "fallback"),  # as in a shell, :- also covers the empty value
        ("pre-${A}-${B:-b}-post", {"A": "a"}, "pre-a-b-post"),
        ("${MODEL:-}x", {}, "x"),
        ("$MODEL", {"MODEL": "nope"}, "$MODEL"),  # only the braced form is interpolated
    ],
)
def test_interpolation(tmp_path: Path, template: str, env: dict[str, str], expected: str) -> None:
    cfg = load(tmp_path, f'llm:\n  ollama:\n    model: "{template}"\n', env)
    assert _ollama(cfg).default_model == expected


def test_interpolation_of_an_unset_variable_without_default_is_empty(tmp_path: Path) -> None:
    # An empty model then falls back to the default model, as an unset one does.
    cfg = load(tmp_path, "llm:\n  ollama:\n    model: ${NOT_SET}\n")
    assert _ollama(cfg).default_model == "gpt-oss:20b"


@pytest.mark.parametrize(
    ("text", "field", "placeholder"),
    [
        (
            'llm:\n  openai: {api_key: "${OPENAI_API_KEY:?set OPENAI_API_KEY}"}\n',
            "llm.openai.api_key",
            "${OPENAI_API_KEY:?set OPENAI_API_KEY}",
        ),
        ('llm:\n  ollama: {model: "${OLLAMA_MODEL-llama3}"}\n', "llm.ollama.model", "${OLLAMA_MODEL-llama3}"),
        (
            'llm:\n  backends:\n    - {name: b, kind: vllm, base_url: "http://${HOST:-h}:${PORT", model: m}\n',
            "llm.backends[0].base_url",
            "${PORT}",
        ),
        ('llm:\n  ollama: {model: "${OLLAMA_MODEL:-${DEFAULT_M}}"}\n', "llm.ollama.model", "${DEFAULT_M}"),
        ('server: {usage_db: "postgresql://llm:Xy${7q!Pw9Zk@db/usage"}\n', "server.usage_db", "${7q!Pw9Zk@db}"),
    ],
)
def test_a_placeholder_of_another_form_is_refused_naming_its_field(
    tmp_path: Path, text: str, field: str, placeholder: str
) -> None:
    # The shell's and docker compose's ${VAR:?message} and ${VAR-default} were kept as they are: the gateway started
    # with a key of that text, or a model of that name.
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, text, {"OPENAI_API_KEY": "sk-set", "OLLAMA_MODEL": "m", "PORT": "1"})
    assert f"{field}: holds a ${{...}} that is not replaced" in str(refused.value)
    assert placeholder.partition("${")[2][:3] not in str(refused.value).partition("replaces")[0], "nothing of it"
    assert "${VAR} and ${VAR:-default}" in str(refused.value) and "not valid YAML" not in str(refused.value)


def test_interpolation_works_in_numbers_and_keys_alike(tmp_path: Path) -> None:
    text = "server:\n  grace_period_s: ${GRACE:-4}\nllm:\n  openai:\n    api_key: ${MY_KEY}\n"
    cfg = load(tmp_path, text, {"MY_KEY": "sk-interpolated"})

    assert cfg.server.grace_period_s == 4.0
    assert _openai(cfg).api_key == "sk-interpolated"


# --- OLLAMA_HOST ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("box", "http://box:11434/v1"),
        ("box:1234", "http://box:1234/v1"),
        (":1234", "http://127.0.0.1:1234/v1"),
        ("0.0.0.0", "http://127.0.0.1:11434/v1"),
        ("0.0.0.0:8000", "http://127.0.0.1:8000/v1"),
        ("http://h:1/", "http://h:1/v1"),
        ("https://h:8443", "https://h:8443/v1"),
        ("[::1]:11434", "http://[::1]:11434/v1"),
        ("[::1]", "http://[::1]:11434/v1"),
        ("[::]:5000", "http://127.0.0.1:5000/v1"),
        # as Ollama's envconfig reads it: scheme http -> port 80, https -> 443, none -> 11434; spaces and quotes trimmed
        ("https://h", "https://h:443/v1"),
        ("http://h", "http://h:80/v1"),
        ("::1", "http://[::1]:11434/v1"),
        (" box ", "http://box:11434/v1"),
        # a path kept, as Ollama keeps it (an Ollama behind a reverse proxy's prefix)
        ("https://proxy.example/ollama/", "https://proxy.example:443/ollama/v1"),
        ("box:8080/a/b", "http://box:8080/a/b/v1"),
        ("[::1]:1/p", "http://[::1]:1/p/v1"),
        ("::1/p", "http://[::1]:11434/p/v1"),
    ],
)
def test_ollama_base_url(host: str, expected: str) -> None:
    assert config.ollama_base_url(host) == expected


def test_ollama_host_with_a_bad_port_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="OLLAMA_HOST"):
        config.ollama_base_url("box:notaport")


# --- extra backends, order, aliases ---------------------------------------------------------------------------------


def test_extra_backends_order_and_aliases(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
llm:
  backends:
    - name: local
      kind: llamacpp
      base_url: http://127.0.0.1:8080/v1/
      model: qwen
      models: [qwen-small, qwen-large]
      fallback: false
      context_window: 8192
    - name: vllm-2
      kind: openai_compatible
      base_url: https://vllm.example/v1
      model: meta-llama/Llama-3.1-8B
      api_key: vk-1
  order: [local, ollama, vllm-2]
  aliases:
    fast: ollama/gpt-oss:20b
    smart: local/qwen
    plain: some-model
""",
    )

    assert cfg.backends == (
        BackendSpec(
            name="local",
            kind="llamacpp",
            base_url="http://127.0.0.1:8080/v1",
            default_model="qwen",
            models=("qwen-small", "qwen-large"),
            fallback=False,
            context_window=8192,
        ),
        BackendSpec(name="ollama", kind="ollama", base_url="http://localhost:11434/v1", default_model="gpt-oss:20b"),
        BackendSpec(
            name="vllm-2",
            kind="openai_compatible",
            base_url="https://vllm.example/v1",
            default_model="meta-llama/Llama-3.1-8B",
            api_key="vk-1",
        ),
    )
    assert cfg.aliases == {"fast": "ollama/gpt-oss:20b", "smart": "local/qwen", "plain": "some-model"}


def test_the_kinds_configuration_accepts_are_the_kinds_the_gateway_can_build() -> None:
    assert sorted(provider_factory(TokenCounter()).kinds) == sorted(config.BACKEND_KINDS)


def test_without_order_the_extras_follow_openai_and_ollama(tmp_path: Path) -> None:
    text = "llm:\n  backends:\n    - {name: zz, kind: openai_compatible, base_url: 'http://z', model: m}\n"
    cfg = load(tmp_path, text, {"OPENAI_API_KEY": "k"})
    assert [b.name for b in cfg.backends] == ["openai", "ollama", "zz"]


def test_order_may_leave_a_backend_out(tmp_path: Path) -> None:
    cfg = load(tmp_path, "llm:\n  order: [openai]\n", {"OPENAI_API_KEY": "k"})
    assert [b.name for b in cfg.backends] == ["openai"]


def test_ollama_section_options(tmp_path: Path) -> None:
    text = "llm:\n  ollama:\n    models: [a, b]\n    fallback: false\n    context_window: 4096\n    api_key: ok\n"
    spec = _ollama(load(tmp_path, text))
    assert (spec.models, spec.fallback, spec.context_window, spec.api_key) == (("a", "b"), False, 4096, "ok")


# --- errors ---------------------------------------------------------------------------------------------------------

ONE_EXTRA = "llm:\n  backends:\n    - {name: local, kind: llamacpp, base_url: 'http://h:1/v1', model: m, %s}\n"


@pytest.mark.parametrize(
    ("yaml_text", "env", "field"),
    [
        # unknown keys
        ("servr: {}\n", {}, "servr"),
        ("server: {lsten: 'a:1'}\n", {}, "server.lsten"),
        ("router: {retry: {retries: 1}}\n", {}, "router.retry.retries"),
        ("llm: {ollama: {host: x}}\n", {}, "llm.ollama.host"),
        (ONE_EXTRA % "colour: red", {}, "llm.backends[0].colour"),
        # wrong types
        ("server: [1, 2]\n", {}, "server"),
        ("server: {grace_period_s: soon}\n", {}, "server.grace_period_s"),
        ("server: {grace_period_s: true}\n", {}, "server.grace_period_s"),
        ("server: {max_message_bytes: 1.5}\n", {}, "server.max_message_bytes"),
        ("server: {listen: [a]}\n", {}, "server.listen"),
        ("server: {event_loop: trio}\n", {}, "server.event_loop"),
        ("router: {retry: {max_retries: 'two'}}\n", {}, "router.retry.max_retries"),
        ("router: {retry: {max_retries: false}}\n", {}, "router.retry.max_retries"),
        ("router: {circuit: 5}\n", {}, "router.circuit"),
        ("llm: {ollama: {fallback: 1}}\n", {}, "llm.ollama.fallback"),
        ("llm: {ollama: {models: gpt}}\n", {}, "llm.ollama.models"),
        ("llm: {ollama: {models: [a, [b]]}}\n", {}, "llm.ollama.models[1]"),
        ("llm: {ollama: {context_window: 1.5}}\n", {}, "llm.ollama.context_window"),
        ("llm: {backends: {name: x}}\n", {}, "llm.backends"),
        ("llm: {backends: [x]}\n", {}, "llm.backends[0]"),
        ("llm: {order: ollama}\n", {}, "llm.order"),
        ("llm: {aliases: [fast]}\n", {}, "llm.aliases"),
        ("llm: {aliases: {fast: [a]}}\n", {}, "llm.aliases.fast"),
        (ONE_EXTRA % "fallback: maybe", {}, "llm.backends[0].fallback"),
        # negative or zero numbers
        ("server: {grace_period_s: -1}\n", {}, "server.grace_period_s"),
        ("server: {drain_s: -1}\n", {}, "server.drain_s"),
        ("server: {max_message_bytes: 0}\n", {}, "server.max_message_bytes"),
        ("server: {health_interval_s: -0.5}\n", {}, "server.health_interval_s"),
        ("router: {request_timeout_s: 0}\n", {}, "router.request_timeout_s"),
        ("router: {stream_idle_timeout_s: -3}\n", {}, "router.stream_idle_timeout_s"),
        ("router: {first_chunk_timeout_s: 0}\n", {}, "router.first_chunk_timeout_s"),
        ("router: {embed_timeout_s: -1}\n", {}, "router.embed_timeout_s"),
        ("router: {retry: {max_retries: -1}}\n", {}, "router.retry.max_retries"),
        ("router: {retry: {initial_backoff_s: 0}}\n", {}, "router.retry.initial_backoff_s"),
        ("router: {retry: {max_backoff_s: -2}}\n", {}, "router.retry.max_backoff_s"),
        ("router: {retry: {max_retry_after_s: 0}}\n", {}, "router.retry.max_retry_after_s"),
        ("router: {circuit: {failure_threshold: 0}}\n", {}, "router.circuit.failure_threshold"),
        ("router: {circuit: {cooldown_s: -1}}\n", {}, "router.circuit.cooldown_s"),
        # bad listen addresses (from the file or the environment)
        ("server: {listen: localhost}\n", {}, "server.listen"),
        ("server: {listen: ':50051'}\n", {}, "server.listen"),
        ("server: {listen: 'localhost:'}\n", {}, "server.listen"),
        ("server: {listen: 'localhost:port'}\n", {}, "server.listen"),
        ("server: {listen: 'localhost:65536'}\n", {}, "server.listen"),
        ("server: {listen: 'localhost:-1'}\n", {}, "server.listen"),
        (None, {"LLMRELAY_LISTEN": "nowhere"}, "--listen (LLMRELAY_LISTEN)"),
        (
            None,
            {"LLMRELAY_LISTEN": "127.0.0.1:²"},
            "--listen (LLMRELAY_LISTEN)",
        ),  # a digit to str.isdigit(), not to int()
        (None, {"LLMRELAY_WORKERS": "²"}, "LLMRELAY_WORKERS"),
        ("server: {worker_timeout_s: 2}\n", {}, "server.worker_timeout_s"),  # below three heartbeats: kills the well
        # a ledger each worker would keep alone
        ("server: {workers: 2, usage_db: ':memory:'}\n", {}, "server.usage_db"),
        (None, {"LLMRELAY_WORKERS": "2", "LLMRELAY_USAGE_DB": ":memory:"}, "LLMRELAY_USAGE_DB"),
        # limits each worker would enforce alone: the field, or the flag (variable) that set the workers
        ("server: {workers: 2, limits: {requests_per_minute: 5}}\n", {}, "server.workers"),
        ("server: {limits: {requests_per_minute: 5}}\n", {"LLMRELAY_WORKERS": "2"}, "--workers (LLMRELAY_WORKERS)"),
        # bad URLs
        ("llm: {ollama: {base_url: 'localhost:11434'}}\n", {}, "llm.ollama.base_url"),
        ("llm: {ollama: {base_url: 'ftp://box/v1'}}\n", {}, "llm.ollama.base_url"),
        ("llm: {ollama: {base_url: 'http://'}}\n", {}, "llm.ollama.base_url"),
        ("llm: {openai: {base_url: 'api.openai.com'}}\n", {"OPENAI_API_KEY": "k"}, "llm.openai.base_url"),
        (
            None,
            {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "nope"},
            "OPENAI_BASE_URL",
        ),  # the variable that set it, not the field
        (None, {"OLLAMA_HOST": "box:99x"}, "OLLAMA_HOST"),
        (
            "llm: {backends: [{name: local, kind: llamacpp, base_url: 'h:1', model: m}]}\n",
            {},
            "llm.backends[0].base_url",
        ),
        ("llm: {ollama: {base_url: 'http://box:99999/v1'}}\n", {}, "llm.ollama.base_url"),
        ("llm: {ollama: {base_url: 'http://box:port/v1'}}\n", {}, "llm.ollama.base_url"),
        # context windows must be positive
        ("llm: {ollama: {context_window: -5}}\n", {}, "llm.ollama.context_window"),
        ("llm: {ollama: {context_window: 0}}\n", {}, "llm.ollama.context_window"),
        (ONE_EXTRA % "context_window: -1", {}, "llm.backends[0].context_window"),
        # extra backends: kind, names, required fields, empty model
        (ONE_EXTRA.replace("llamacpp", "gemini") % "fallback: true", {}, "llm.backends[0].kind"),
        # max_tokens: an anthropic backend's only, and positive
        (ONE_EXTRA % "max_tokens: 100", {}, "llm.backends[0].max_tokens"),
        ("llm: {openai: {max_tokens: 100}}\n", {"OPENAI_API_KEY": "k"}, "llm.openai.max_tokens"),
        ("llm: {anthropic: {max_tokens: 0}}\n", {"ANTHROPIC_API_KEY": "k"}, "llm.anthropic.max_tokens"),
        (None, {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "nope"}, "ANTHROPIC_BASE_URL"),
        (
            "llm: {backends: [{name: ollama, kind: ollama, base_url: 'http://h', model: m}]}\n",
            {},
            "llm.backends[0].name",
        ),
        (
            "llm:\n  backends:\n"
            "    - {name: twin, kind: llamacpp, base_url: 'http://a', model: m}\n"
            "    - {name: twin, kind: llamacpp, base_url: 'http://b', model: m}\n",
            {},
            "llm.backends[1].name",
        ),
        (
            "llm: {backends: [{name: Local, kind: llamacpp, base_url: 'http://h', model: m}]}\n",
            {},
            "llm.backends[0].name",
        ),
        ("llm: {backends: [{name: 1x, kind: llamacpp, base_url: 'http://h', model: m}]}\n", {}, "llm.backends[0].name"),
        (
            "llm: {backends: [{name: 'a b', kind: llamacpp, base_url: 'http://h', model: m}]}\n",
            {},
            "llm.backends[0].name",
        ),
        ("llm: {backends: [{name: '', kind: llamacpp, base_url: 'http://h', model: m}]}\n", {}, "llm.backends[0].name"),
        ("llm: {backends: [{name: local, kind: llamacpp, base_url: 'http://h'}]}\n", {}, "llm.backends[0].model"),
        ("llm: {backends: [{kind: llamacpp, base_url: 'http://h', model: m}]}\n", {}, "llm.backends[0].name"),
        (
            "llm: {backends: [{name: local, kind: llamacpp, base_url: 'http://h', model: ''}]}\n",
            {},
            "llm.backends[0].model",
        ),
        # order and aliases
        ("llm: {order: [ollama, nope]}\n", {}, "llm.order[1]"),
        ("llm: {order: [openai]}\n", {}, "llm.order[0]"),  # no key, so no openai backend
        ("llm: {order: [ollama, ollama]}\n", {}, "llm.order[1]"),
        ("llm: {aliases: {fast: openai/gpt-4o}}\n", {}, "llm.aliases.fast"),
        ("llm: {aliases: {local: llamacpp/qwen}}\n", {}, "llm.aliases.local"),
        ("llm: {aliases: {a: b, b: ollama/qwen}}\n", {}, "llm.aliases.a"),  # not followed twice
        ("llm: {aliases: {same: same}}\n", {}, "llm.aliases.same"),
        ("llm: {aliases: {fast: olama/qwen}}\n", {}, "llm.aliases.fast"),  # a near miss of a backend's name
        # Naming no backend or no model, or no name a caller can ask for: accepted, then listed as served, and every
        # call for them NOT_FOUND.
        ("llm: {aliases: {empty: ollama/}}\n", {}, "llm.aliases.empty"),
        ("llm: {aliases: {slash: /tiny}}\n", {}, "llm.aliases.slash"),
        ("llm: {aliases: {'': ollama/tiny}}\n", {}, "llm.aliases"),
        # A model's name with a line break (a YAML block's `|`, a value read from a file) went upstream so, every call
        # NOT_FOUND, and no caller could name it.
        ("llm:\n  ollama:\n    model: |\n      tiny\n", {}, "llm.ollama.model"),
        (None, {"LLMRELAY_OLLAMA_MODEL": "tiny\n"}, "LLMRELAY_OLLAMA_MODEL"),
        (None, {"OPENAI_API_KEY": "sk-test", "LLMRELAY_OPENAI_MODEL": "gpt-4o\n"}, "LLMRELAY_OPENAI_MODEL"),
        ('llm: {ollama: {models: [a, "b\\n"]}}\n', {}, "llm.ollama.models[1]"),
        ('llm: {ollama: {embedding_model: "e\\t"}}\n', {}, "llm.ollama.embedding_model"),
        ('llm: {aliases: {fast: "ollama/tiny\\n"}}\n', {}, "llm.aliases.fast"),
        # The ledger's path by its variable: a SQLite file named with a line break; blank, blamed on the field.
        (None, {"LLMRELAY_USAGE_DB": "/var/lib/llmrelay/usage.db\n"}, "LLMRELAY_USAGE_DB"),
        (None, {"LLMRELAY_USAGE_DB": "   "}, "LLMRELAY_USAGE_DB"),
        # the file itself
        ("server: [\n", {}, "not valid YAML"),
        ("server:\n  listen: a\n listen: b\n", {}, "not valid YAML"),
        ("- server\n- llm\n", {}, "top level must be a mapping"),
        ("just some text\n", {}, "top level must be a mapping"),
        ("42\n", {}, "top level must be a mapping"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, yaml_text: str | None, env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text, env)
    message = str(caught.value)
    assert field in message
    if not field.startswith(("not valid", "top level")):
        assert message.startswith(f"{field}:"), message


def test_an_alias_may_name_a_model_whose_own_name_has_a_slash(tmp_path: Path) -> None:
    cfg = load(tmp_path, "llm: {aliases: {llama: meta-llama/Llama-3-8B, fast: ollama/meta-llama/x}}\n")
    assert cfg.aliases == {"llama": "meta-llama/Llama-3-8B", "fast": "ollama/meta-llama/x"}
    with pytest.raises(ConfigError, match=r"^llm.aliases.a: points at another alias \(of 'ollama/qwen'\); an alias"):
        load(tmp_path, "llm: {aliases: {a: b, b: ollama/qwen}}\n")
    with pytest.raises(ConfigError, match=r"no backend is named 'olama' \(did you mean 'ollama'\?\)"):
        load(tmp_path, "llm: {aliases: {fast: olama/qwen}}\n")


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*llmrelay\.yaml"):
        load(tmp_path, "server: [\n")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_file_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "absent.yaml" if kind == "missing" else tmp_path
    with pytest.raises(ConfigError) as caught:
        load_config({}, path)
    assert str(path) in str(caught.value)
    assert "cannot be read" in str(caught.value)


def test_a_file_that_is_not_utf8_is_named_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# réglages\nserver: {drain_s: 1}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config({}, path)
    assert str(caught.value) == f"config file {path}: not UTF-8 text (byte 3 cannot be read); save it as UTF-8"
    with pytest.raises(ConfigError, match=r"keys file .*latin1\.yaml: not UTF-8 text"):
        config.load_keys_file(path)


def test_a_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "yaml_text",
    [
        pytest.param("router: {request_timeout_s: .nan}\n", id="request_timeout_s"),
        pytest.param("server: {grace_period_s: .nan}\n", id="grace_period_s"),
        pytest.param("router: {circuit: {cooldown_s: .NaN}}\n", id="cooldown_s"),
        pytest.param("router: {retry: {max_backoff_s: .nan}}\n", id="max_backoff_s"),
    ],
)
def test_nan_numbers_are_rejected(tmp_path: Path, yaml_text: str) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, yaml_text)


# --- secrets --------------------------------------------------------------------------------------------------------

SECRET = "sk-live-SUPERSECRET-0123456789"


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        (f"llm: {{openai: {{api_key: [{SECRET}]}}}}\n", "llm.openai.api_key"),
        (f"llm: {{openai: {{api_key: {{{SECRET}: 1}}}}}}\n", "llm.openai.api_key"),
        (f"llm: {{ollama: {{api_key: [{SECRET}]}}}}\n", "llm.ollama.api_key"),
        (ONE_EXTRA % f"api_key: [{SECRET}]", "llm.backends[0].api_key"),
        (ONE_EXTRA % f"api_key: {{nested: {SECRET}}}", "llm.backends[0].api_key"),
        # A store URL (its password) mistyped as a list, or as a mapping in another field, and a YAML mistake on the
        # line of a secret, which PyYAML's own message quotes.
        (f'server: {{usage_db: ["postgresql://relay:{SECRET}@db/llmrelay"]}}\n', "server.usage_db"),
        (f'state: {{redis_url: ["redis://:{SECRET}@redis:6379/0"]}}\n', "state.redis_url"),
        (f"server: {{log_format: {{{SECRET}: 1}}}}\n", "server.log_format"),
        (f'llm:\n  openai: {{api_key: "{SECRET}" oops}}\n', "config file"),
        # A section written as its secret alone; a secret that YAML reads as an alias's, an anchor's or a tag's name.
        (f"llm: {{openai: {SECRET}}}\n", "llm.openai"),
        (f"state: redis://:{SECRET}@redis:6379/0\n", "state"),
        (f"server: postgresql://relay:{SECRET}@db/llmrelay\n", "server"),
        (f"llm: {{openai: {{api_key: *{SECRET}}}}}\n", "config file"),
        (f"llm: {{openai: {{api_key: !{SECRET} x}}}}\n", "config file"),
        (f"a: &{SECRET} x\nb: &{SECRET} y\n", "config file"),
    ],
)
def test_a_mistyped_api_key_is_never_shown(tmp_path: Path, yaml_text: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text)
    message = str(caught.value)
    assert message.split(":")[0].startswith(field)  # "config file PATH: not valid YAML..." for the file's own mistake
    assert "SUPERSECRET" not in message
    assert "SUPERSECRET" not in repr(caught.value)


@pytest.mark.parametrize(
    ("yaml_text", "said"),
    [
        ('state: {redis_url: "redis://:SUPERSECRET@127.0.0.1:notaport/0"}\n', "notaport"),
        ('state: {redis_url: "redis://:SUPERSECRET@127.0.0.1:6379/0?socket_timeout=abc"}\n', "socket_timeout"),
        ('state: {redis_url: "redis://:SUPERSECRET@[::1/0"}\n', "IPv6"),
        ('server: {usage_db: "postgresql://app:50%off-SUPERSECRET@127.0.0.1/db"}\n', "%25"),
        # Generated passwords hold these: written as is, they end the authority, and the password would be shown as
        # part of the database's path (Health, the log) or quoted as its port.
        ('state: {redis_url: "redis://:SUPER/SECRET@redis:6379/0"}\n', "%2F"),
        ('state: {redis_url: "redis://default:SUPER#SECRET@redis:6379/0"}\n', "%23"),
        ('server: {usage_db: "postgresql://app:SUPERSECRET/x@db:5432/llmrelay"}\n', "%2F"),
        ('server: {usage_db: "postgresql://app:SUPER?SECRET@db:5432/llmrelay"}\n', "%3F"),
        ('server: {usage_db: "postgresql://app:SUPER?x=SECRET@db:5432/llmrelay"}\n', "%3F"),
        ('state: {redis_url: "redis://app:SUPER?x=SECRET@redis:6379/0"}\n', "%3F"),
        # An '@' in the password too: the authority ended at that one, and the '@' after it was let through.
        ('server: {usage_db: "postgresql://u:p@ss/SUPERSECRET@db:5432/llmrelay"}\n', "%40"),
        ('state: {redis_url: "redis://:p@ss?SUPERSECRET@redis:6379/0"}\n', "%40"),
        ('state: {redis_url: "redis://:p@ss#SUPERSECRET@redis:6379/0"}\n', "%40"),
        # Two in the authority: libpq ended the user part at the first, and quoted the rest as the host.
        ('server: {usage_db: "postgresql://u:p@SUPERSECRET@db:5432/llmrelay"}\n', "%40"),
        ('state: {redis_url: "redis://:p@SUPERSECRET@redis:6379/0"}\n', "%40"),
        ('server: {usage_db: "host=db port=5432 user=app password=SUPERSECRET dbname=llmrelay"}\n', "postgresql://"),
        ('state: {redis_url: "SUPERSECRET:x"}\n', "scheme (none)"),
        # redis-py would take the path for database 0.
        ('state: {redis_url: "redis://:SUPERSECRET@redis:6379/limits"}\n', "not a database number"),
        # Options redis-py refuses when it connects, at every call, while the gateway served on, its limits unenforced.
        ('state: {redis_url: "redis://:SUPERSECRET@redis:6379/0?socket_timout=1"}\n', "?socket_timout= is no option"),
        ('state: {redis_url: "rediss://:SUPERSECRET@redis:6379/0?ssl_cert_reqs=maybe"}\n', "maybe"),
        ('state: {redis_url: "redis://:SUPERSECRET@redis:6379/0?protocol=9"}\n', "protocol must be either 2 or 3"),
        # Options libpq refuses at every try to connect, while the gateway served on, its ledger unavailable for good.
        ('server: {usage_db: "postgresql://u:SUPERSECRET@db/ledger?sslmod=require"}\n', '"sslmod"'),
        ('server: {usage_db: "postgresql://u:SUPER SECRET@db/ledger"}\n', 'unexpected spaces found in "***"'),
        # libpq's other ways to give it: quoted as they were before the host.
        ('server: {usage_db: "postgresql://u@db/ledger?password=SUPER SECRET"}\n', 'unexpected spaces found in "***"'),
        ('server: {usage_db: "postgresql://u@db/ledger?sslpassword=SUPER SECRET"}\n', 'spaces found in "***"'),
        # A character of :// missing: a SQLite file named after it, its password in its name, served by Health.
        ('server: {usage_db: "postgresql:/u:SUPERSECRET@db/ledger"}\n', "not a PostgreSQL URL"),
        ('server: {usage_db: "postgresql:u:SUPERSECRET@db/ledger"}\n', "not a PostgreSQL URL"),
        ('server: {usage_db: "postgres//u:SUPERSECRET@db/ledger"}\n', "not a PostgreSQL URL"),
    ],
    ids=[
        "redis port",
        "redis option",
        "redis host",
        "postgresql percent",
        "redis slash",
        "redis hash",
        "postgresql slash",
        "postgresql question mark",
        "postgresql question mark and equals",
        "redis question mark and equals",
        "postgresql at and slash",
        "redis at and question mark",
        "redis at and hash",
        "postgresql two ats",
        "redis two ats",
        "postgresql key=value",
        "redis no scheme",
        "redis database",
        "redis unknown option",
        "redis bad option",
        "redis bad protocol",
        "postgresql unknown option",
        "postgresql space",
        "postgresql space in ?password=",
        "postgresql space in ?sslpassword=",
        "postgresql one slash",
        "postgresql no slash",
        "postgresql no colon",
    ],
)
def test_a_malformed_store_url_is_named_without_its_password(tmp_path: Path, yaml_text: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text)
    message = str(caught.value)
    assert message.startswith(("state.redis_url:", "server.usage_db:")) and said in message, message
    assert "SUPERSECRET" not in message


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ("ssl_ca_certs={tmp}/missing.pem", "(?ssl_ca_certs=): a file does not exist"),
        ("ssl_ca_certs={tmp}/not.pem", "(?ssl_ca_certs=) cannot be used: each must be PEM"),
        ("ssl_certfile={tmp}/not.pem&ssl_keyfile={tmp}/not.pem", "(?ssl_certfile=, ?ssl_keyfile=) cannot be used"),
        ("ssl_ca_certs={tmp}", "(?ssl_ca_certs=) cannot be read: Is a directory"),
    ],
    ids=["missing", "not PEM", "client certificate not PEM", "a directory"],
)
def test_the_tls_files_of_a_rediss_url_are_read_at_start(tmp_path: Path, options: str, said: str) -> None:
    """redis-py reads them at its first connection: the gateway started, and every call to Redis failed, its limits
    unenforced (or every call refused), the reason in Health alone."""
    (tmp_path / "not.pem").write_text("not a certificate\n")
    url = f"rediss://:SUPERSECRET@127.0.0.1:6379/0?{options.format(tmp=tmp_path)}"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'state: {{redis_url: "{url}"}}\n')
    message = str(caught.value)
    assert message.startswith("state.redis_url: the TLS files it names ") and said in message, message
    assert "SUPERSECRET" not in message and str(tmp_path) not in message


def test_a_rediss_url_with_readable_tls_files_loads(tmp_path: Path) -> None:
    ca = Authority("redis test CA")
    ca.server().write(tmp_path / "client.pem", tmp_path / "client.key")
    (tmp_path / "ca.pem").write_bytes(ca.cert)
    url = (
        f"rediss://:SUPERSECRET@127.0.0.1:6379/0?ssl_ca_certs={tmp_path}/ca.pem"
        f"&ssl_certfile={tmp_path}/client.pem&ssl_keyfile={tmp_path}/client.key"
    )
    assert load(tmp_path, f'state: {{redis_url: "{url}"}}\n').state.redis_url == url


@pytest.mark.parametrize(
    "url",
    ["postgresql://db:5432/llmrelay?user=admin@server", "postgresql://app:SUPER%2FSECRET@db/llmrelay"],
    ids=["an @ in a query's value", "an escaped slash"],
)
def test_a_store_url_with_an_at_sign_where_it_may_be_is_taken(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, f'server: {{usage_db: "{url}"}}\n').server.usage_db == url


def test_the_configuration_files_text_is_kept_for_the_workers_and_never_shown(tmp_path: Path) -> None:
    text = 'server: {listen: "127.0.0.1:0"}\nllm: {openai: {api_key: "sk-SUPERSECRET"}}\n'
    cfg = load(tmp_path, text)
    assert cfg.file_text == text
    assert "SUPERSECRET" not in repr(cfg)
    assert load(tmp_path, None).file_text is None


def test_an_empty_redis_url_is_told_as_an_unset_variable(tmp_path: Path) -> None:
    # As for the other fields that name a file or a store: not "scheme (none) is not redis://".
    with pytest.raises(ConfigError, match=r"^state\.redis_url: empty \(an unset \$\{VAR\}\?\)"):
        load(tmp_path, 'state: {redis_url: ""}\n')


@pytest.mark.parametrize("listen", ["127.1:0", "*:0", "[127.0.0.1]:0", " 127.0.0.1:0", "0177.0.0.1:0", "a b:0"])
def test_a_host_grpc_cannot_listen_on_is_refused_at_load(tmp_path: Path, listen: str) -> None:
    # gRPC's own line said it could not parse the name, and the start that the address was in use.
    with pytest.raises(ConfigError, match=r"^--listen \(LLMRELAY_LISTEN\): not HOST:PORT \(its HOST is no IP address"):
        load(tmp_path, None, {"LLMRELAY_LISTEN": listen})


@pytest.mark.parametrize(
    "listen", ["localhost:0", "0.0.0.0:50051", "[::]:0", "gateway-1.internal.:443", "[fe80::1%eth0]:0"]
)
def test_an_address_or_a_host_name_is_taken_to_listen_on(tmp_path: Path, listen: str) -> None:
    assert load(tmp_path, None, {"LLMRELAY_LISTEN": listen}).server.listen == listen


@pytest.mark.parametrize("listen", ["unix:/run/llmrelay.sock", "unix:///run/llmrelay.sock", "unix-abstract:llmrelay"])
@pytest.mark.parametrize("where", ["--listen (LLMRELAY_LISTEN)", "server.metrics_listen"])
def test_a_unix_socket_to_listen_on_is_refused_as_one(tmp_path: Path, listen: str, where: str) -> None:
    """gRPC's addresses of a Unix socket (the SDKs take them as loopback targets) were refused as HOST:PORT whose "port
    is not a number from 0 to 65535", its path read as the port."""
    env = {"LLMRELAY_LISTEN": listen} if where.startswith("--listen") else {}
    text = f'server: {{metrics_listen: "{listen}"}}\n' if where == "server.metrics_listen" else None
    said = f"{where}: unix sockets are not served; listen on HOST:PORT (e.g. 127.0.0.1:50051)"
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, text, env)
    assert str(refused.value) == said
    assert "port" not in str(refused.value).replace("HOST:PORT", "")


def test_an_ipv6_address_to_listen_on_takes_brackets(tmp_path: Path) -> None:
    # Unbracketed, gRPC read ::1:0 as 0.1.0.0 port 443 and the server said the address was in use.
    with pytest.raises(
        ConfigError, match=r"^--listen \(LLMRELAY_LISTEN\): an IPv6 address takes brackets.*\[::1\]:50051"
    ):
        load(tmp_path, None, {"LLMRELAY_LISTEN": "::1:0"})
    with pytest.raises(ConfigError, match=r"^server\.metrics_listen: an IPv6 address takes brackets"):
        load(tmp_path, "server: {metrics_listen: '::1:9090'}\n")
    assert load(tmp_path, None, {"LLMRELAY_LISTEN": "[::1]:0"}).server.listen == "[::1]:0"


def test_a_value_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--listen \(LLMRELAY_LISTEN\): not HOST:PORT \(its port is not a"):
        load(tmp_path, "server: {listen: '127.0.0.1:50051'}\n", {"LLMRELAY_LISTEN": "garbage:port"})
    # A store URL from the environment, the secret in it never shown.
    secret = "s3cr3t-pw"
    with pytest.raises(ConfigError, match=r"^LLMRELAY_USAGE_DB: mysql:// is not a ledger") as error:
        load(tmp_path, "server: {usage_db: ledger.db}\n", {"LLMRELAY_USAGE_DB": f"mysql://app:{secret}@db/x"})
    assert secret not in str(error.value)
    with pytest.raises(ConfigError, match=r"^LLMRELAY_REDIS_URL: the user or password .* percent-encode") as error:
        load(tmp_path, "", {"LLMRELAY_REDIS_URL": f"redis://:{secret}/x@cache:6379/0"})
    assert secret not in str(error.value)
    with pytest.raises(ConfigError, match=r"^state.redis_url: scheme http is not redis://"):
        load(tmp_path, "state: {redis_url: 'http://cache:6379'}\n")
    with pytest.raises(ConfigError, match=r"cannot be read .*; check LLMRELAY_CONFIG$"):
        load_config({"LLMRELAY_CONFIG": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match=r"cannot be read .*; check the --config path$"):
        load_config({}, tmp_path / "missing.yaml")


def test_a_yaml_mistake_says_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML: .* at line 2, column \d+$"):
        load(tmp_path, 'llm:\n  openai: {api_key: "x" oops}\n')


@pytest.mark.parametrize("field", ["cert_file", "key_file", "client_ca_file"])
def test_an_empty_tls_file_is_refused_not_taken_for_none(tmp_path: Path, field: str) -> None:
    # An unset ${VAR} reads as empty: an empty client_ca_file must not turn mutual TLS off without a word.
    files = {"cert_file": "server.pem", "key_file": "server.key", "client_ca_file": "ca.pem", field: "${UNSET_FILE}"}
    tls = ", ".join(f'{name}: "{value}"' for name, value in files.items())
    with pytest.raises(ConfigError, match=rf"^server\.tls\.{field}: empty \(an unset \$\{{VAR\}}\?\)"):
        load(tmp_path, f"server: {{tls: {{{tls}}}}}\n")


@pytest.mark.parametrize(
    ("yaml_text", "said"),
    [
        ("llm: {openai: {model: gpt-4o, api_key=sk-SUPERSECRET}}\n", "llm.openai: a key holding '='"),
        ("llm: {openai: {model: gpt-4o, api_key sk-SUPERSECRET}}\n", "llm.openai: a key holding a space"),
        ("llm: {openai: {model: gpt-4o, api_key:sk-SUPERSECRET}}\n", "llm.openai: a key holding ':'"),
        (f"server: {{sk-SUPERSECRET{'0' * 40}: 1}}\n", "server: a key of 54 characters"),
        ("api_key=sk-SUPERSECRET: 1\n", "the top level: a key holding '='"),
    ],
    ids=["equals", "space", "colon", "long", "top level"],
)
def test_an_unknown_key_that_may_hold_a_value_is_not_shown(tmp_path: Path, yaml_text: str, said: str) -> None:
    # A key's value written into the key (`=` for `: `) is shown nowhere: only the section it is in.
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text)
    assert str(caught.value).startswith(said) and "SUPERSECRET" not in str(caught.value), caught.value


def test_an_unknown_field_near_a_known_one_is_named_with_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^server\.grace_period: unknown field \(did you mean 'grace_period_s'\?\)"):
        load(tmp_path, "server: {grace_period: 5}\n")


@pytest.mark.parametrize("written", [f"1{'0' * 400}", '"${HUGE}"'], ids=["in the file", "through a variable"])
def test_a_whole_number_too_large_is_named(tmp_path: Path, written: str) -> None:
    # It ended in an OverflowError, with a traceback, where the checks take numbers as floats.
    with pytest.raises(ConfigError, match=r"^server\.max_concurrent_rpcs: too large a number"):
        load(tmp_path, f"server: {{max_concurrent_rpcs: {written}}}\n", {"HUGE": f"1{'0' * 400}"})


@pytest.mark.parametrize("name", ["LLMRELAY_CONFIG", "LLMRELAY_KEYS_FILE", "LLMRELAY_REDIS_URL", "LLMRELAY_USAGE_DB"])
def test_a_variable_set_but_empty_is_refused_not_taken_for_unset(tmp_path: Path, name: str) -> None:
    # An empty LLMRELAY_KEYS_FILE left the gateway open to anyone, without a word.
    with pytest.raises(ConfigError, match=rf"^{name}: empty \(an unset variable\?\)"):
        load(tmp_path, None, {name: " "})


@pytest.mark.parametrize("section", ["openai", "anthropic", "ollama"])
def test_a_blank_base_url_is_refused_not_taken_for_the_default_server(tmp_path: Path, section: str) -> None:
    """An unset ${VAR} reads as empty: taken for left out, the public API's URL took its place, and the section's
    key and every prompt went there rather than to the server meant."""
    text = f'llm:\n  {section}: {{api_key: "sk-for-the-proxy-0123456789", base_url: "${{CORP_URL}}"}}\n'
    with pytest.raises(ConfigError, match=rf"^llm\.{section}\.base_url: empty \(an unset \$\{{VAR\}}\?\)"):
        load(tmp_path, text)


def test_an_empty_config_variable_under_the_config_flag_is_not_read(tmp_path: Path) -> None:
    assert load(tmp_path, "server: {workers: 1}\n", {"LLMRELAY_CONFIG": ""}).server.workers == 1


@pytest.mark.parametrize(
    ("yaml_text", "env", "said"),
    [
        ('auth: {keys_file: "${KEYS}"}\n', {"KEYS": "keys:\n- SUPERSECRET"}, "auth.keys_file"),
        ("{}\n", {"LLMRELAY_KEYS_FILE": "keys.yaml\nSUPERSECRET"}, "LLMRELAY_KEYS_FILE"),
        ('server: {usage_journal_dir: "${DIR}"}\n', {"DIR": "j\rSUPERSECRET"}, "server.usage_journal_dir"),
        (
            'server: {tls: {cert_file: c.pem, key_file: "${KEY}"}}\n',
            {"KEY": "-----\nSUPERSECRET"},
            "server.tls.key_file",
        ),
    ],
    ids=["keys_file", "LLMRELAY_KEYS_FILE", "usage_journal_dir", "tls key_file"],
)
def test_a_path_with_a_line_break_is_refused_unshown(
    tmp_path: Path, yaml_text: str, env: dict[str, str], said: str
) -> None:
    # A file's content given for its path (a PEM key through ${VAR}) was shown whole as the file that cannot be read.
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text, env)
    message = str(caught.value)
    assert message.startswith(f"{said}: holds a line break") and "SUPERSECRET" not in message, message


def test_a_path_from_a_variable_is_shown_by_its_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, 'auth: {keys_file: "/nowhere/${OPENAI_API_KEY}"}\n', {"OPENAI_API_KEY": "sk-SUPERSECRET"})
    assert str(caught.value).startswith("keys file /nowhere/${OPENAI_API_KEY}: cannot be read"), caught.value


def test_an_error_carries_the_log_format_the_file_asked_for(tmp_path: Path) -> None:
    for log_format in ("json", "text"):
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, f"server: {{log_format: {log_format}, drain_s: -1}}\n")
        assert caught.value.log_format == log_format


def test_a_mistyped_non_secret_value_is_shown(tmp_path: Path) -> None:
    # The contrast that makes the test above meaningful: ordinary values are quoted to help the fix.
    with pytest.raises(ConfigError, match=r"^server\.grace_period_s: expected a number, got 'VISIBLE'"):
        load(tmp_path, "server: {grace_period_s: VISIBLE}\n")


def test_the_key_never_appears_in_repr(tmp_path: Path) -> None:
    spec = BackendSpec(name="openai", kind="openai", base_url="https://x/v1", default_model="m", api_key=SECRET)
    assert "SUPERSECRET" not in repr(spec)
    assert "SUPERSECRET" not in str(spec)
    assert spec.api_key == SECRET

    cfg = load(tmp_path, f"llm: {{ollama: {{api_key: {SECRET}}}}}\n", {"OPENAI_API_KEY": SECRET})
    assert [b.api_key for b in cfg.backends] == [SECRET, SECRET]
    assert "SUPERSECRET" not in repr(cfg)


@pytest.mark.parametrize("secret", [f"@{SECRET}", f"{SECRET}: x", f"`{SECRET}", f"{SECRET} # not a comment"])
def test_an_interpolated_secret_is_taken_literally(tmp_path: Path, secret: str) -> None:
    # Interpolation happens after parsing: YAML-special characters in a value cannot break (or leak through) the file.
    cfg = load(tmp_path, "llm:\n  openai:\n    api_key: ${OPENAI_KEY}\n", {"OPENAI_KEY": secret})
    assert cfg.backends[0].api_key == secret


def test_a_number_may_come_from_the_environment(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "router: {retry: {max_retries: '${RETRIES}'}, request_timeout_s: '${BOUND:-12.5}'}\n",
        {"RETRIES": "4"},
    )
    assert (cfg.router.retry.max_retries, cfg.router.request_timeout_s) == (4, 12.5)


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("False", False), ("yes", True), ("off", False)])
def test_a_boolean_may_come_from_the_environment(tmp_path: Path, text: str, expected: bool) -> None:
    yaml_text = "server: {log_content: '${LOG_CONTENT}', tracing: '${TRACING:-false}'}\n"
    cfg = load(tmp_path, yaml_text, {"LOG_CONTENT": text})
    assert (cfg.server.log_content, cfg.server.tracing) == (expected, False)


def test_a_boolean_from_the_environment_must_be_one(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"server.log_content: expected true or false, got the value of \$\{LOG_CONTENT\} \(not shown"
    ):
        load(tmp_path, "server: {log_content: '${LOG_CONTENT}'}\n", {"LOG_CONTENT": "maybe"})


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(config.Limits)])
def test_each_limit_alone_counts_as_a_limit_set(field: str) -> None:
    assert not config.Limits().any_set()
    assert config.Limits(**{field: 1}).any_set()


# --- what fuzzing the loader found: each a ConfigError naming the field, never a traceback or a secret ---------------


@pytest.mark.parametrize(
    ("yaml_text", "said"),
    [
        # PyYAML's constructors let a ValueError, KeyError or AttributeError out, quoting the value.
        ("server: {workers: !!int SUPERSECRET}\n", "its tag"),
        ("server: {drain_s: !!float SUPERSECRET}\n", "its tag"),
        ("server: {log_calls: !!bool SUPERSECRET}\n", "its tag"),
        ("server: {listen: !!timestamp SUPERSECRET}\n", "its tag"),
        ("llm: {order: &a [*a]}\n", "alias"),  # a list that holds itself
        ("server: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        # A key given twice: PyYAML would let the second silently drop the first (here the whole first section).
        ("server: {listen: '127.0.0.1:1'}\nrouter: {}\nserver: {workers: 1}\n", "'server' twice"),
        ("server: {drain_s: 1, drain_s: 2}\n", "'drain_s' twice"),
    ],
    ids=["int tag", "float tag", "bool tag", "timestamp tag", "recursive alias", "deep", "section twice", "key twice"],
)
def test_yaml_that_cannot_be_read_is_a_config_error(tmp_path: Path, yaml_text: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text)
    message = str(caught.value)
    assert message.startswith("config file ") and "not valid YAML" in message and said in message, message
    assert "SUPERSECRET" not in message


def test_merge_keys_may_be_overridden_and_aliases_stay_cheap(tmp_path: Path) -> None:
    # `<<: *base` then the same key is YAML's way to override a merged value, not a key given twice.
    text = "x: &base {drain_s: 5, grace_period_s: 7}\n"
    cfg = load(tmp_path, "server: {<<: {drain_s: 5, grace_period_s: 7}, drain_s: 0}\n")
    assert (cfg.server.drain_s, cfg.server.grace_period_s) == (0, 7)
    # Aliases of aliases, 10**9 strings if each alias were copied: refused for the unknown field, at once.
    levels = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
    with pytest.raises(ConfigError, match="unknown field"):
        load(tmp_path, "l0: &l0 [x]\n" + levels + text)


@pytest.mark.parametrize(
    ("yaml_text", "env", "field"),
    [
        (f"server: {{drain_s: {10**400}}}\n", {}, "server.drain_s"),  # past a float's range: an OverflowError
        ('auth: {keys_file: "keys\\0.yaml"}\n', {}, "auth.keys_file"),  # a ValueError of os at start
        ('server: {usage_db: "usage\\0.db"}\n', {}, "server.usage_db"),
        ('server: {tls: {cert_file: "a\\0.crt", key_file: k}}\n', {}, "server.tls.cert_file"),
        # gRPC's C int: an OverflowError as the server is made
        (f"server: {{max_concurrent_rpcs: {2**31}}}\n", {}, "server.max_concurrent_rpcs"),
        # gRPC takes keepalive times in milliseconds, in a C int
        ("server: {keepalive_s: 1e9}\n", {}, "server.keepalive_s"),
        ("server: {min_caller_ping_interval_s: 0}\n", {}, "server.min_caller_ping_interval_s"),
        # a cooldown goes back to callers as RetryInfo: past a Duration's range every call failed INTERNAL
        ("router: {circuit: {cooldown_s: 1e300}}\n", {}, "router.circuit.cooldown_s"),
        ("router: {retry: {max_backoff_s: 1e10}}\n", {}, "router.retry.max_backoff_s"),
        # an unset ${VAR}: no keys (calls open to anyone), SQLite's temporary database, the working directory
        ('auth: {keys_file: "${KEYS_FILE}"}\n', {}, "auth.keys_file"),
        ('server: {usage_db: "${USAGE_DB}"}\n', {}, "server.usage_db"),
        ('server: {usage_journal_dir: " "}\n', {}, "server.usage_journal_dir"),
        # urlsplit's ValueError ("Invalid IPv6 URL") escaped
        (ONE_EXTRA.replace("'http://h:1/v1'", "'http://[::1'") % "fallback: true", {}, "llm.backends[0].base_url"),
        (None, {"OLLAMA_HOST": "[::1"}, "OLLAMA_HOST"),
        (None, {"OLLAMA_HOST": "http://u:SUPERSECRET@h:x"}, "OLLAMA_HOST"),
        (None, {"OLLAMA_HOST": "http://SUPERSECRET@h:99999"}, "OLLAMA_HOST"),  # a token as the user, quoted
        (None, {"LLMRELAY_WORKERS": "5000"}, "LLMRELAY_WORKERS"),  # the variable, not the field it overrides
    ],
    ids=[
        "huge float",
        "NUL keys_file",
        "NUL usage_db",
        "NUL cert_file",
        "max_concurrent_rpcs",
        "keepalive",
        "ping interval 0",
        "circuit cooldown",
        "retry backoff",
        "empty keys_file",
        "empty usage_db",
        "blank journal dir",
        "base_url IPv6",
        "OLLAMA_HOST IPv6",
        "OLLAMA_HOST user",
        "OLLAMA_HOST token",
        "LLMRELAY_WORKERS",
    ],
)
def test_values_that_escaped_validation(tmp_path: Path, yaml_text: str | None, env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text, env)
    message = str(caught.value)
    assert field in message.split(": ")[0], message
    assert "SUPERSECRET" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("yaml_text", "env", "field"),
    [
        # The parser's own words quote what it took for the port: with no @HOST, the password.
        (None, {"LLMRELAY_REDIS_URL": "redis://:SUPERSECRET"}, "LLMRELAY_REDIS_URL"),
        # urlsplit's words quote the whole authority when a character normalizes to a delimiter.
        ('state: {redis_url: "redis://u:SUPER\uff03SECRET@h:6379/0"}\n', {}, "state.redis_url"),
        ('server: {usage_db: "postgresql://u:SUPER\uff03SECRET@h/db"}\n', {}, "server.usage_db"),
        # A backend's URL is shown to callers and in the log, and its user and password are never sent.
        (
            ONE_EXTRA.replace("'http://h:1/v1'", "'http://u:SUPERSECRET@h:1/v1'") % "fallback: true",
            {},
            "llm.backends[0]",
        ),
        ("llm: {openai: {base_url: 'htp://u:SUPERSECRET@h'}}\n", {"OPENAI_API_KEY": "k"}, "llm.openai.base_url"),
        (None, {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "https://u:SUPERSECRET@h/v1"}, "OPENAI_BASE_URL"),
        # A key goes out in a header on every request: one no header can carry stopped the start with a traceback
        # (ValueError, or UnicodeEncodeError from the header's encoding).
        (None, {"OPENAI_API_KEY": "sk-SUPERSECRET\n"}, "OPENAI_API_KEY: has a line break or another control"),
        (None, {"ANTHROPIC_API_KEY": "sk-SUPERSECRETк"}, "ANTHROPIC_API_KEY: has a character outside printable"),
        ('llm: {openai: {api_key: "sk-SUPER\\nSECRET"}}\n', {}, "llm.openai.api_key: has a line break"),
        ('llm: {ollama: {api_key: "SUPERSECRET\\t"}}\n', {}, "llm.ollama.api_key: has a line break"),
        (ONE_EXTRA % "api_key: 'SUPERSECRETé'", {}, "llm.backends[0].api_key: has a character outside"),
        # A query was taken: every call went to ".../v1?key=.../chat/completions" (a 404 for a missing model), and the
        # URL, key and all, was shown to callers in Health and in the log.
        (None, {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "https://h/v1?k=SUPERSECRET"}, "OPENAI_BASE_URL: has a"),
        ("llm: {ollama: {base_url: 'http://h:1/v1#SUPERSECRET'}}\n", {}, "llm.ollama.base_url: has a query"),
        ("llm: {ollama: {base_url: 'http://h:1/v1?'}}\n", {}, "llm.ollama.base_url: has a query"),
        (ONE_EXTRA.replace("/v1'", "/v1?key=SUPERSECRET'") % "fallback: true", {}, "llm.backends[0].base_url: has a"),
        # A URL that does not parse (a bad port, a `#` or `[` in the password) still has its password found.
        ("llm: {ollama: {base_url: 'http://u:SUPERSECRET@h:80x/v1'}}\n", {}, "llm.ollama.base_url: holds a user"),
        ("llm: {ollama: {base_url: 'http://u:SUPER#SECRET@h:1/v1'}}\n", {}, "llm.ollama.base_url: holds a user"),
        ("llm: {ollama: {base_url: 'http://u:SUPER[SECRET@h:1/v1'}}\n", {}, "llm.ollama.base_url: holds a user"),
        # A key put in the wrong field (through the wrong ${VAR}) is not shown as the value that field could not take.
        ("llm: {ollama: {base_url: 'sk-SUPERSECRET'}}\n", {}, "llm.ollama.base_url: not an http(s) URL"),
        ("server: {listen: 'sk-SUPERSECRET'}\n", {}, "server.listen: not HOST:PORT"),
        (None, {"LLMRELAY_LISTEN": "https://admin:SUPERSECRET@db.example.com"}, "--listen (LLMRELAY_LISTEN): not"),
        (None, {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://h:SUPERSECRET/v1"}, "OPENAI_BASE_URL: not an"),
        (None, {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "SUPERSECRET"}, "OPENAI_BASE_URL: not an http(s) URL"),
        (None, {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "SUPERSECRET:x"}, "OPENAI_BASE_URL: not an http(s) URL"),
    ],
    ids=[
        "redis without host", "redis NFKC", "postgresql NFKC", "extra backend", "openai field", "openai variable",
        "key-newline-variable", "key-cyrillic-variable", "key-newline-field", "key-tab-ollama", "key-accent-extra",
        "query-variable", "fragment", "empty-query", "query-extra-backend", "password-bad-port", "password-hash",
        "password-bracket", "key-as-url", "key-as-listen", "key-as-url-variable", "url-as-listen", "key-as-port",
        "key-colon-as-url",
    ],
)  # fmt: skip
def test_a_secret_in_the_configuration_is_refused_unshown(
    tmp_path: Path, yaml_text: str | None, env: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text, env)
    message = str(caught.value)
    assert message.startswith(field), message
    assert "SUPERSECRET" not in message


def test_two_keys_with_one_digest_are_refused(tmp_path: Path) -> None:
    # An entry copied for a new caller, its sha256 left: one key would be either caller, the other entry unused.
    entries = f'[{{name: a, sha256: "{"ab" * 32}"}}, {{name: b, sha256: "{"ab" * 32}"}}]'
    with pytest.raises(ConfigError, match=r"auth\.keys\[1\]\.sha256: the same as that of key 'a'"):
        load(tmp_path, f"auth: {{keys: {entries}}}\n")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys: {entries}\n")
    with pytest.raises(ConfigError, match=r"keys\[1\]\.sha256: the same as that of key 'a'"):
        config.load_keys_file(keys_file)


def test_the_digest_of_an_empty_key_is_refused(tmp_path: Path) -> None:
    """What `printf %s "$KEY" | sha256sum` prints with $KEY unset: `authorization: Bearer ` (nothing after it) was
    that caller, and so was a call without a key at all, which was looked up as the empty key."""
    entry = f'[{{name: ops, sha256: "{hashlib.sha256(b"").hexdigest()}", read_all_usage: true}}]'
    with pytest.raises(ConfigError, match=r"auth\.keys\[0\]\.sha256: is the SHA-256 of nothing"):
        load(tmp_path, f"auth: {{keys: {entry}}}\n")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys: {entry}\n")
    with pytest.raises(ConfigError, match=r"keys\[0\]\.sha256: is the SHA-256 of nothing"):
        config.load_keys_file(keys_file)


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ('pricing: {"gpt-4o": {prompt: 2.5, completion: 1e19}}\n', r"pricing\.gpt-4o\.completion"),
        ('pricing: {"gpt-4o": {prompt: 2.5e7, completion: 10}}\n', r"pricing\.gpt-4o\.prompt"),
        (
            'pricing: {"gpt-4o": {prompt: 2.5, completion: 10, cached_prompt: 1.25e9}}\n',
            r"pricing\.gpt-4o\.cached_prompt",
        ),
        (
            'pricing: {"claude": {prompt: 3, completion: 15, cache_write_prompt: 2e6}}\n',
            r"pricing\.claude\.cache_write_prompt",
        ),
        ("unknown_price: {prompt: 5, completion: 1.5e10}\n", r"unknown_price\.completion"),
    ],
)
def test_a_price_no_cost_could_be_kept_at_is_refused(tmp_path: Path, yaml_text: str, field: str) -> None:
    # At such a price one long answer costs more micro-USD than 64 bits hold: its cost could not be sent, nor its
    # record stored in the ledger.
    with pytest.raises(ConfigError, match=rf"^{field}: .* USD per million tokens is over 1,000,000 "):
        load(tmp_path, yaml_text)


@pytest.mark.parametrize(
    ("price", "shown"), [("1000001", "1,000,001"), ("1000000.5", "1000000.5"), ("1.5e10", "15,000,000,000")]
)
def test_a_price_just_over_the_bound_is_shown_apart_from_it(tmp_path: Path, price: str, shown: str) -> None:
    """Both were written in six digits: "1e+06 USD per million tokens is over 1e+06"."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'pricing: {{"m": {{prompt: {price}, completion: 1}}}}\n')
    assert str(caught.value).startswith(f"pricing.m.prompt: {shown} USD per million tokens is over 1,000,000 (")


def test_a_cache_write_price_is_read_and_none_below_zero(tmp_path: Path) -> None:
    loaded = load(tmp_path, 'pricing: {"claude-*": {prompt: 3, completion: 15, cache_write_prompt: 3.75}}\n')
    assert loaded.pricing["claude-*"] == config.Price(prompt=3, completion=15, cache_write_prompt=3.75)
    with pytest.raises(ConfigError, match=r"pricing\.claude-\*\.cache_write_prompt"):
        load(tmp_path, 'pricing: {"claude-*": {prompt: 3, completion: 15, cache_write_prompt: -1}}\n')


def test_the_dearest_price_taken_is_a_dollar_a_token(tmp_path: Path) -> None:
    loaded = load(tmp_path, 'pricing: {"o1-pro": {prompt: 1000000, completion: 1000000}}\n')
    assert loaded.pricing["o1-pro"] == config.Price(prompt=1_000_000, completion=1_000_000)


SECRET = "sk-LIVE-0123456789abcdef"


@pytest.mark.parametrize(
    "yaml_text",
    [
        "server: {workers: '${OPENAI_API_KEY}'}\n",
        "server: {drain_s: '${OPENAI_API_KEY}'}\n",
        "server: {log_format: '${OPENAI_API_KEY}'}\n",
        "server: {event_loop: '${OPENAI_API_KEY}'}\n",
        "state: {on_unavailable: '${OPENAI_API_KEY}'}\n",
        "router: {retry: {max_retries: 'x${OPENAI_API_KEY}'}}\n",
        "llm: {backends: [{name: '${OPENAI_API_KEY}', kind: vllm, base_url: 'http://h/v1', model: m}]}\n",
        "llm: {backends: [{name: b, kind: '${OPENAI_API_KEY}', base_url: 'http://h/v1', model: m}]}\n",
        "llm: {order: ['${OPENAI_API_KEY}']}\n",
    ],
)
def test_a_secret_in_the_wrong_fields_variable_is_named_not_shown(tmp_path: Path, yaml_text: str) -> None:
    # A ${VAR} in the wrong field put its value, a key, in the error that stopped the start (the log, a terminal).
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text, {"OPENAI_API_KEY": SECRET})
    assert SECRET not in str(caught.value) and "${OPENAI_API_KEY}" in str(caught.value)


@pytest.mark.parametrize("usage_db", ["postgres.db", "postgresql-ledger.db", "postgresql/ledger.db"])
def test_a_sqlite_file_named_after_postgresql_is_one(tmp_path: Path, usage_db: str) -> None:
    assert load(tmp_path, None, {"LLMRELAY_USAGE_DB": usage_db}).server.usage_db == usage_db


@pytest.mark.parametrize("written", ["http://127.0.0.1:11434/v1\n", "http://127.0.0.1:11434/v1 ", "http://my host/v1"])
@pytest.mark.parametrize("by_variable", [True, False], ids=["OPENAI_BASE_URL", "base_url"])
def test_a_base_url_with_a_space_or_a_control_character_stops_the_start(
    tmp_path: Path, written: str, by_variable: bool
) -> None:
    """A line break at its end (a variable read from a file) stopped the start with the HTTP client's traceback; a
    space failed every call (a host not found, a path not found)."""
    env = {"OPENAI_API_KEY": "sk-set"} | ({"OPENAI_BASE_URL": written} if by_variable else {})
    text = None if by_variable else f"llm:\n  openai: {{base_url: {json.dumps(written)}}}\n"
    field = "OPENAI_BASE_URL" if by_variable else "llm.openai.base_url"
    with pytest.raises(ConfigError, match=f"^{field}: holds a space or a control character"):
        load(tmp_path, text, env)


def test_an_open_service_set_by_a_variable_is_not_shown(tmp_path: Path) -> None:
    """A ${VAR} of a key in the wrong field put the key in the error that stopped the start."""
    loaded = load(tmp_path, 'auth: {open_services: ["${OPENAI_API_KEY}"]}\n', {"OPENAI_API_KEY": SECRET})
    with pytest.raises(ConfigError) as caught:
        app._check_open_services(loaded.auth.open_services)
    assert SECRET not in str(caught.value) and "${OPENAI_API_KEY}" in str(caught.value)


def test_a_placeholder_in_a_key_is_refused_naming_its_mapping(tmp_path: Path) -> None:
    """Left as it was, an alias named "${ALIAS:-fast}" served no caller, and a price for the pattern "${MODEL}" none."""
    with pytest.raises(ConfigError, match=r"llm\.aliases: the key '\$\{ALIAS:-fast\}' holds a \$\{\.\.\.\}"):
        load(tmp_path, 'llm:\n  aliases: {"${ALIAS:-fast}": ollama/tiny}\n', {"ALIAS": "quick"})


@pytest.mark.parametrize(
    ("usage_db", "says"),
    [
        ("postgresql://u:pw@127.0.0.1:abc/db", "a port in the URL is not a number"),
        ("postgresql://u:pw@127.0.0.1:99999/db", "a port in the URL is not a number"),
        ("postgresql://u:pw@db1:5432,db2:99999/db", "a port in the URL is not a number"),
        ("postgresql://u:pw@127.0.0.1:5432/db?sslmode=wrong", "sslmode='wrong' is none of"),
    ],
)
def test_a_postgresql_url_libpq_would_refuse_stops_the_start(tmp_path: Path, usage_db: str, says: str) -> None:
    # The gateway served on, its ledger unavailable for good, the records piling up in a journal.
    with pytest.raises(ConfigError, match=f"^LLMRELAY_USAGE_DB: {says}") as caught:
        load(tmp_path, None, {"LLMRELAY_USAGE_DB": usage_db})
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "usage_db",
    ["postgresql://u:pw@db1:5432,db2:5433/db", "postgresql://u:pw@db1,db2/db", "postgresql://u:pw@[::1]:5432,db2/db"],
)
def test_a_postgresql_url_of_several_hosts_as_libpq_takes_them_is_taken(tmp_path: Path, usage_db: str) -> None:
    # libpq tries each host in turn (a primary and its standby): the URL's port check read them as one port.
    assert load(tmp_path, None, {"LLMRELAY_USAGE_DB": usage_db}).server.usage_db == usage_db


@pytest.mark.parametrize(
    "usage_db",
    [
        "postgresql://app:pw@127.0.0.1/ledger?application_name=relay%40prod",
        "postgresql://app:p%40ss%2Fword@127.0.0.1/ledger?sslpassword=k%40y",
        "postgresql:///ledger?host=/var/run/postgresql&user=app@corp",
    ],
)
def test_an_at_sign_encoded_in_a_postgresql_urls_query_is_taken(tmp_path: Path, usage_db: str) -> None:
    # As the refusal of an '@' written as is after the host tells: percent-encoded, as %40 (a query decoded first
    # refused it too).
    assert load(tmp_path, None, {"LLMRELAY_USAGE_DB": usage_db}).server.usage_db == usage_db


@pytest.mark.parametrize("field", ["drain_s", "grace_period_s", "health_interval_s", "max_connection_age_s"])
def test_the_servers_waits_are_at_most_a_day(tmp_path: Path, field: str) -> None:
    # A drain of 1e300 s (a figure meant in ms, say) held every stop up for ever.
    with pytest.raises(ConfigError, match=f"server.{field}: at most 86400 s"):
        load(tmp_path, f"server: {{{field}: 1e300}}\n")


@pytest.mark.parametrize(
    ("yaml_text", "says"),
    [
        ("server: 5\n", "server: expected a mapping, got 5"),
        ("server:\n  tls: 5.0\n", "server.tls: expected a mapping, got 5.0"),
        ("auth:\n  keys: 5\n", "auth.keys: expected a list, got an int"),
        ("auth:\n  keys_file: [a]\n", "auth.keys_file: expected text, got a list"),
    ],
)
def test_a_number_in_the_wrong_place_is_named_as_a_number(tmp_path: Path, yaml_text: str, says: str) -> None:
    """The error named the class YAML's reading made of it: "got _WrittenInt", "got a _WrittenInt"."""
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, yaml_text)
    assert str(raised.value) == says


@pytest.mark.parametrize(
    ("value", "said"), [("0", "must be a finite number > 0"), ("-1", "must be a finite number > 0"),
                        (str(2**31), "at most 2147483647 (calls on one connection)")],
)  # fmt: skip
def test_the_streams_a_connection_may_have_open_are_bounded_sensibly(tmp_path: Path, value: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, f"server: {{max_streams_per_connection: {value}}}\n")
    assert str(refused.value) == f"server.max_streams_per_connection: {said}"
