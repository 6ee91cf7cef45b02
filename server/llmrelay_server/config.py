"""Configuration: defaults, then an optional YAML file, then environment variables (each overrides the one before).

Validated once at start; a ConfigError names the field and the fix, and never shows a secret's value.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import hashlib
import ipaddress
import math
import os
import re
import ssl
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

import yaml

from llmrelay_server.domain import CALLER_NAME, CONTROL_CHARACTERS, BackendSpec

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "gpt-4o"
DEFAULT_OLLAMA_HOST = "http://localhost:11434"
DEFAULT_OLLAMA_MODEL = "gpt-oss:20b"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-5"
BACKEND_KINDS = ("openai", "anthropic", "ollama", "openai_compatible", "llamacpp", "vllm")


class ConfigError(ValueError):
    """Bad configuration; the message names the field and says how to fix it."""

    log_format: str = "text"
    """The log format the configuration file asked for, when it was read far enough to say: the error is then said
    in it (a collector parsing a JSON log would not take a line of text)."""


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 2
    """Retries on the same backend after a retryable failure, before the next backend takes over."""
    initial_backoff_s: float = 0.2
    """The first backoff; it doubles with each retry, with full jitter."""
    max_backoff_s: float = 2.0
    """The cap of one backoff."""
    max_retry_after_s: float = 10.0
    """The longest upstream Retry-After honoured; a longer one moves to the next backend instead."""


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    failure_threshold: int = 5
    """Consecutive failed attempts after which a backend is skipped."""
    cooldown_s: float = 30.0
    """How long an open circuit skips the backend before one probe call is let through."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    retry: RetryConfig = field(default_factory=RetryConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    request_timeout_s: float = 300.0
    """The bound on a whole call when the caller sets no deadline."""
    first_chunk_timeout_s: float = 15.0
    """How long a backend that took a request may stay silent before its first chunk (a stream) or its answer
    (Complete): past it the attempt counts as a failure of the backend and the next route is tried at once."""
    embed_timeout_s: float = 120.0
    """As first_chunk_timeout_s, for an Embed's answer: a batch of many inputs on a model server without a GPU takes
    far longer than a chat's first chunk, and has no stream to show it is going on."""
    stream_idle_timeout_s: float = 60.0
    """A stream that sends nothing for this long after it started has broken (ABORTED, or restarted)."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert_file: str
    """The PEM certificate (chain) the gateway presents. Re-read when it changes on disk: new connections use it."""
    key_file: str
    """The PEM private key of cert_file."""
    client_ca_file: str | None = None
    """A PEM CA bundle; when set, every client must present a certificate it signed (mutual TLS)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one caller key, or of the whole gateway (server.limits); unset means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    """Prompt plus completion tokens; a request reserves its prompt and max_tokens at admission."""
    concurrent_streams: int | None = None
    budget_usd_per_day: float | None = None
    """Spend per UTC day, at the price table's rates."""

    def any_set(self) -> bool:
        # Asked on every model call: spelt out, as dataclasses.astuple deep-copies the fields each time.
        return (
            self.requests_per_minute is not None
            or self.tokens_per_minute is not None
            or self.concurrent_streams is not None
            or self.budget_usd_per_day is not None
        )


@dataclass(frozen=True, slots=True)
class CallerKey:
    """A key callers present as `authorization: Bearer KEY`. Only its SHA-256 is configured, never the key."""

    name: str
    """The caller's identity in the ledger, logs and metrics."""
    sha256: str
    """The SHA-256 of the whole key text, in hex (`llmrelay-server keys new NAME` prints it)."""
    models: tuple[str, ...] = ()
    """Glob patterns of the model names it may request ("ollama/*", "gpt-4o*"); empty: every model."""
    limits: Limits = field(default_factory=Limits)
    read_all_usage: bool = False
    """Whether GetUsage shows it every caller's usage (an operator's, a dashboard's key); else only its own."""


# Probes and tools must reach these without a key.
DEFAULT_OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "llmrelay.v1.LLMService/Health",
)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    keys: tuple[CallerKey, ...] = ()
    """With no keys (here and in keys_file), calls are open to anyone who can reach the port."""
    keys_file: str | None = None
    """A YAML file with more keys (`keys: [...]`), kept apart from the rest; re-read on change or SIGHUP."""
    open_services: tuple[str, ...] = DEFAULT_OPEN_SERVICES
    """Services ("pkg.Service") or methods ("pkg.Service/Method") callers reach without a key."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    prompt: float
    completion: float
    cached_prompt: float | None = None
    """Prompt tokens served from the upstream's cache; unset: the prompt rate."""
    cache_write_prompt: float | None = None
    """Prompt tokens written to the upstream's cache (Anthropic bills them above its input rate); unset: the prompt
    rate."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    """HOST:PORT to serve gRPC on."""
    drain_s: float = 1.0
    """On SIGTERM, how long health shows NOT_SERVING (and new model calls get UNAVAILABLE; CountTokens, GetUsage and
    Health are still answered) before the port closes, so that load balancers and probes see the shutdown and stop
    sending calls."""
    grace_period_s: float = 10.0
    """Then, how long calls in flight may take to finish."""
    max_message_bytes: int = 4 * 1024 * 1024
    """The largest request (and answer) accepted; larger requests get RESOURCE_EXHAUSTED (REQUEST_TOO_LARGE)."""
    max_image_bytes: int = 20 * 1024 * 1024
    """The largest image a message may carry as bytes; larger ones get INVALID_ARGUMENT. The whole request is also
    bound by max_message_bytes, which is checked first: raise both to accept images over 4 MiB."""
    workers: int = 1
    """Server processes sharing the port (SO_REUSEPORT), under one supervising process; more than one needs
    state.redis_url when any limit is set (each process would otherwise enforce the limits alone)."""
    worker_timeout_s: float = 30.0
    """With workers: a worker whose event loop has not run for this long (blocked, or the process stopped) is killed
    and restarted, as the kernel keeps giving it new connections that would wait on it until their deadlines; and one
    that has not started to serve within twice this long."""
    usage_db: str = "llmrelay-usage.db"
    """The usage ledger: a SQLite file (":memory:" keeps it in memory), or a PostgreSQL URL
    ("postgresql://user:password@host:5432/db"; libpq's PG* variables fill in what it leaves out)."""
    usage_journal_dir: str | None = None
    """Where each process journals its usage records on disk until the ledger has them (a process killed, a database
    down); unset: beside a SQLite file (FILE.journal), or ./llmrelay-usage-HASH.journal for PostgreSQL (HASH: of the
    database the URL reaches, user@host:port/dbname, libpq's PG* variables filling in what it leaves out: one
    directory for each database)."""
    usage_journal_max_bytes: int = 256 * 1024 * 1024
    """The most one process's journal holds while the database is down; past it, records are dropped and counted."""
    usage_by_minute_days: int | None = 31
    """How many days of usage the ledger keeps by the minute; each older UTC day is kept as one row per backend, model
    and caller (GetUsage's window then takes such a day whole, by its start). null: by the minute for ever."""
    health_interval_s: float = 15.0
    """How often the backends are probed in the background."""
    tls: TLSConfig | None = None
    """Unset: plaintext (fine on loopback; a warning elsewhere)."""
    limits: Limits = field(default_factory=Limits)
    """Limits of the whole gateway, over every caller."""
    max_concurrent_rpcs: int | None = None
    """The bound on calls of the gateway's service in progress at once (its Health RPC and the health service are not
    bounded); more are refused with RESOURCE_EXHAUSTED, reason CONCURRENT_CALLS_EXCEEDED. Per process: each worker
    has its own."""
    max_streams_per_connection: int = 1000
    """The calls one connection may have open at once (HTTP/2's MAX_CONCURRENT_STREAMS): a client queues those past
    it. Unbounded, one connection (no key needed) could open streams whose request never ends, which no call bound
    counts, some 20 KiB of the process's memory each."""
    keepalive_s: float = 30.0
    """How often the gateway pings a caller's connection (HTTP/2 PING) to learn whether the caller is still there."""
    keepalive_timeout_s: float = 20.0
    """How long a ping may go unanswered before the connection is closed and its calls cancelled, their upstream
    requests with them: a caller gone without a word (its host down, its network cut) is let go within keepalive_s
    + keepalive_timeout_s, not held until TCP gives up (some 15 minutes) or for ever."""
    min_caller_ping_interval_s: float = 5.0
    """How often a caller's client may ping the gateway while no answer is on its way (a keepalive of its own):
    oftener, and gRPC closes the connection with GOAWAY "too_many_pings" at the third. gRPC's own default is 5
    minutes, which cuts off clients that ping every 10-30 s, as agents waiting on long answers are set up to."""
    max_connection_age_s: float | None = None
    """Once a caller's connection is this old (give or take a tenth), the gateway asks the caller to move on (HTTP/2
    GOAWAY): calls in flight finish on it, new ones go over a new connection, which a balancer or the kernel (workers)
    may put elsewhere; unset: a connection lives as long as its caller keeps it, on the replica or worker it first
    reached."""
    reserve_completion_tokens: int = 1024
    """What a request without max_tokens reserves for its answer against its limits, on a route that asks its upstream
    for no limit (an Anthropic backend asks for its own max_tokens, which is reserved instead)."""
    metrics_listen: str | None = None
    """HOST:PORT to serve Prometheus metrics on (path /metrics); unset: no metrics endpoint."""
    log_calls: bool = True
    """One log line per call (with its request id, returned as x-request-id); off, only warnings and errors."""
    log_format: str = "text"
    """The one line per call, and every other log line: "text" for people, "json" for log pipelines."""
    log_content: bool = False
    """Whether prompts and answers may appear in logs and traces; off, nothing a caller wrote is recorded."""
    tracing: bool = False
    """OpenTelemetry traces (the `llmrelay[otel]` extra), exported as the standard OTEL_* variables say."""
    event_loop: str = "uvloop"
    """The asyncio event loop: "uvloop" (less CPU per call: `make bench` measured 10-25% off a plain grpc.aio
    server's, 0-10% off the gateway's; Python's own loop where uvloop is not installed) or "asyncio"."""


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where the state that gateways share lives: limits and budgets."""

    redis_url: str | None = None
    """redis:// (or rediss:// for TLS, unix:// for a socket), with user and password when the server asks for them:
    every gateway naming the same Redis or Valkey enforces one set of limits; unset: limits kept in this process."""
    on_unavailable: str = "allow"
    """When Redis cannot be reached: "allow" admits calls without counting them until it is back; "deny" refuses
    them with UNAVAILABLE."""
    timeout_s: float = 0.5
    """How long one check-and-reserve may wait for Redis before Redis counts as unreachable."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    backends: tuple[BackendSpec, ...] = ()
    """In routing order."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Model names the caller may use for another model, e.g. {"fast": "ollama/gpt-oss:20b"}."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    pricing: Mapping[str, Price] = field(default_factory=dict)
    """Prices by model pattern ("gpt-4o", "gpt-4o-2024-*", "ollama/*"), over the shipped table."""
    unknown_price: Price = field(default_factory=lambda: Price(prompt=5.0, completion=15.0))
    """The rate budgets count for a model with no known price on a paid backend."""
    state: StateConfig = field(default_factory=StateConfig)
    file_text: str | None = field(default=None, repr=False, compare=False)
    """The configuration file's text as it was read (None without a file): what a supervisor hands its workers, so
    that all of them run what it checked. Never shown: it may hold keys."""
    usage_db_named: str = field(default="server.usage_db", compare=False)
    """Where the ledger's store was named (server.usage_db, or LLMRELAY_USAGE_DB over it): what an error opening it
    tells the operator to mend."""


# The YAML shapes of the backends, before they become BackendSpecs.
@dataclass(frozen=True, slots=True)
class _BackendSection:
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    models: tuple[str, ...] = ()
    fallback: bool = True
    context_window: int | None = None
    max_tokens: int | None = None
    """The answer's length limit when a request sets none; the anthropic kind only (its API requires one)."""
    embedding_model: str | None = None
    embedding_models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class _ExtraBackendSection(_BackendSection):
    """A backend beyond openai, anthropic and ollama: it has no defaults to fall back on, so it names all of them."""

    name: str
    kind: str
    base_url: str
    model: str


@dataclass(frozen=True, slots=True)
class _LLMSection:
    openai: _BackendSection | None = None
    anthropic: _BackendSection | None = None
    ollama: _BackendSection | None = None
    backends: tuple[_ExtraBackendSection, ...] = ()
    order: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _FileSection:
    server: ServerConfig = field(default_factory=ServerConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    llm: _LLMSection = field(default_factory=_LLMSection)
    auth: AuthConfig = field(default_factory=AuthConfig)
    pricing: Mapping[str, Price] = field(default_factory=dict)
    unknown_price: Price | None = None
    state: StateConfig = field(default_factory=StateConfig)


@dataclass(frozen=True, slots=True)
class _KeysFile:
    keys: tuple[CallerKey, ...] = ()


def load_config(env: Mapping[str, str] | None = None, path: str | Path | None = None) -> GatewayConfig:
    """Reads the file (path, else $LLMRELAY_CONFIG, else none) and the environment into a validated config."""
    env = os.environ if env is None else env
    _FROM_THE_ENVIRONMENT.set(())  # this load's files alone
    # Set but blank (`LLMRELAY_KEYS_FILE=$KEYS`, KEYS unset), these were taken for unset without a word: a start on
    # the defaults, a gateway open to anyone, each process keeping its own limits. The --config flag refuses it too.
    # LLMRELAY_USAGE_DB's, a ledger of its own in the working directory, in place of the one replicas share.
    for name in ("LLMRELAY_CONFIG", "LLMRELAY_KEYS_FILE", "LLMRELAY_REDIS_URL", "LLMRELAY_USAGE_DB"):
        if name in env and not env[name].strip() and not (name == "LLMRELAY_CONFIG" and path):
            raise ConfigError(f"{name}: empty (an unset variable?): give one, or leave the variable unset")
    # An error names where its value came from: a variable set long ago is easy to forget.
    to_find_it = "check the --config path" if path else "check LLMRELAY_CONFIG"
    path = path or env.get("LLMRELAY_CONFIG") or None
    document: Mapping[str, Any] = {}
    text = None
    if path:
        where = f"config file {path}"
        text = _read_text(Path(path), where, to_find_it)
        document = _parse_yaml(text, env, where, " (server, router, llm)") or {}
    try:
        return _checked(document, text, env)
    except ConfigError as error:
        error.log_format = _log_format_asked(document)
        raise


def _log_format_asked(document: Mapping[str, Any]) -> str:
    """The log format the file's server.log_format asks for, as far as it says: "text" unless it says "json"."""
    server = document.get("server")
    return "json" if isinstance(server, Mapping) and server.get("log_format") == "json" else "text"


def _checked(document: Mapping[str, Any], text: str | None, env: Mapping[str, str]) -> GatewayConfig:
    """The configuration of the file's `document` (its `text`) and the environment, validated."""
    section = _build(_FileSection, document, "")
    server = section.server
    if env.get("LLMRELAY_LISTEN"):
        server = dataclasses.replace(server, listen=env["LLMRELAY_LISTEN"])
    if env.get("LLMRELAY_USAGE_DB"):
        server = dataclasses.replace(server, usage_db=env["LLMRELAY_USAGE_DB"])
    if env.get("LLMRELAY_WORKERS"):
        server = dataclasses.replace(server, workers=_workers(env["LLMRELAY_WORKERS"], "LLMRELAY_WORKERS"))
    state = section.state
    if env.get("LLMRELAY_REDIS_URL"):
        state = dataclasses.replace(state, redis_url=env["LLMRELAY_REDIS_URL"])
    _check_state(state, "LLMRELAY_REDIS_URL" if env.get("LLMRELAY_REDIS_URL") else "state.redis_url")
    usage_db_named = "LLMRELAY_USAGE_DB" if env.get("LLMRELAY_USAGE_DB") else "server.usage_db"
    _check_usage_db(server.usage_db, usage_db_named)
    _check_listen(server.listen, "--listen (LLMRELAY_LISTEN)" if env.get("LLMRELAY_LISTEN") else "server.listen")
    if server.tls is not None:
        _check_tls(server.tls)
    if server.metrics_listen is not None:
        _check_listen(server.metrics_listen, "server.metrics_listen")
    if server.log_format not in ("text", "json"):
        shown = shown_value(server.log_format, "server.log_format")
        raise ConfigError(f"server.log_format: {shown} is not text or json")
    if server.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(
            f"server.event_loop: {shown_value(server.event_loop, 'server.event_loop')} is not uvloop or asyncio"
        )
    _check_positive(server, "server", allow_zero=("drain_s",))
    _check_positive(section.router, "router")
    _check_positive(section.router.retry, "router.retry", allow_zero=("max_retries",))
    _check_positive(section.router.circuit, "router.circuit")
    # A circuit's cooldown and the retries' waits go back to callers as RetryInfo (a Duration, up to some 292 years
    # of nanoseconds): past that every call while the circuit is open failed INTERNAL. A day is past any sense.
    # The server's too: a drain or grace period of 1e300 s (a figure meant in ms) held every stop up for ever.
    for timers, where in (
        (section.router.circuit, "router.circuit"),
        (section.router.retry, "router.retry"),
        (server, "server"),
    ):
        for f in dataclasses.fields(timers):
            if f.name.endswith("_s") and (getattr(timers, f.name) or 0) > MAX_ROUTER_WAIT_S:
                raise ConfigError(f"{where}.{f.name}: at most {MAX_ROUTER_WAIT_S:g} s (a day)")
    _check_positive(server.limits, "server.limits")
    if server.max_concurrent_rpcs is not None and server.max_concurrent_rpcs <= 0:
        raise ConfigError("server.max_concurrent_rpcs: must be > 0, or left out for no bound")
    if server.max_concurrent_rpcs is not None and server.max_concurrent_rpcs > MAX_CONCURRENT_RPCS:
        # More than any process could hold: a number that large is a mistake (a value meant for something else).
        raise ConfigError(f"server.max_concurrent_rpcs: at most {MAX_CONCURRENT_RPCS}, or left out for no bound")
    if server.max_streams_per_connection > MAX_CONCURRENT_RPCS:  # (0 and below: _check_positive)
        raise ConfigError(f"server.max_streams_per_connection: at most {MAX_CONCURRENT_RPCS} (calls on one connection)")
    for name in ("keepalive_s", "keepalive_timeout_s", "min_caller_ping_interval_s", "max_connection_age_s"):
        if (value := getattr(server, name)) is not None and value > MAX_CONNECTION_TIMER_S:
            raise ConfigError(f"server.{name}: at most {MAX_CONNECTION_TIMER_S:g} s (a day)")
    if server.max_message_bytes > MAX_MESSAGE_BYTES:
        raise ConfigError(f"server.max_message_bytes: at most {MAX_MESSAGE_BYTES} (gRPC's bound, 2 GiB - 1)")
    workers_where = "--workers (LLMRELAY_WORKERS)" if env.get("LLMRELAY_WORKERS") else "server.workers"
    if server.workers > MAX_WORKERS:
        raise ConfigError(f"{workers_where}: at most {MAX_WORKERS} processes (a few per CPU core serve best)")
    if server.worker_timeout_s < MIN_WORKER_TIMEOUT_S:
        raise ConfigError(
            f"server.worker_timeout_s: at least {MIN_WORKER_TIMEOUT_S:g} s (a worker says it runs once a second; less"
            " would kill workers that are well)"
        )
    # An unset ${VAR} reads as empty. An empty keys file would drop every key (calls open to anyone, without a
    # word); an empty journal directory, the working directory (an empty ledger path: `_check_usage_db`).
    for name, value in (
        ("server.usage_journal_dir", server.usage_journal_dir),
        ("auth.keys_file", section.auth.keys_file),
    ):
        if value is not None and not value.strip():
            raise ConfigError(f"{name}: empty (an unset ${{VAR}}?): give one, or leave the field out")
    _check_path(server.usage_journal_dir, "server.usage_journal_dir")
    auth = section.auth
    if env.get("LLMRELAY_KEYS_FILE"):
        auth = dataclasses.replace(auth, keys_file=env["LLMRELAY_KEYS_FILE"])
    _check_path(auth.keys_file, "LLMRELAY_KEYS_FILE" if env.get("LLMRELAY_KEYS_FILE") else "auth.keys_file")
    _check_keys(auth.keys, "auth.keys")
    # A broken keys file stops the start, as a broken config does.
    file_keys = load_keys_file(auth.keys_file) if auth.keys_file else ()
    for pattern, price in section.pricing.items():
        _check_price(price, f"pricing.{pattern}")
    unknown_price = section.unknown_price or Price(prompt=5.0, completion=15.0)
    _check_price(unknown_price, "unknown_price")
    backends = _backends(section.llm, env)
    aliases = dict(section.llm.aliases)
    names = {b.name for b in backends}
    for alias, target in aliases.items():
        _check_alias(alias, target, aliases, names)
    keyed_limits = (server.limits, *(key.limits for key in (*auth.keys, *file_keys)))
    if server.workers > 1 and state.redis_url is None and any(limits.any_set() for limits in keyed_limits):
        raise ConfigError(
            f"{workers_where}: {server.workers} processes would each enforce the limits alone (up to {server.workers}"
            " times each limit); set state.redis_url to share them, or run one worker"
        )
    if server.workers > 1 and server.usage_db == ":memory:":
        raise ConfigError(
            f"{usage_db_named}: ':memory:' keeps each worker's usage in that worker alone (GetUsage would answer with"
            " one worker's share of it, and a worker's restart would lose it); with"
            f" {workers_where} {server.workers}, give a SQLite file or a PostgreSQL URL, or run one worker"
        )
    return GatewayConfig(
        state=state,
        server=server,
        router=section.router,
        backends=backends,
        aliases=aliases,
        auth=auth,
        pricing=dict(section.pricing),
        unknown_price=unknown_price,
        file_text=text,
        usage_db_named=usage_db_named,
    )


def is_postgresql(usage_db: str) -> bool:
    return usage_db.startswith(("postgresql://", "postgres://"))


_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


_CONNINFO = re.compile(r"\s*(host|hostaddr|port|dbname|user|password|passfile|service|sslmode)\s*=")
"""The start of libpq's keyword/value connection string ("host=db dbname=ledger password=...")."""


_MISTYPED_POSTGRESQL = re.compile(r"postgres(?:ql)?(?::(?!//)|//)", re.IGNORECASE)
"""A URL of PostgreSQL's with a character of its '://' missing (postgresql:/, postgresql:, postgresql//)."""


def _check_usage_db(usage_db: str, where: str) -> None:
    """`where`: the field, or the variable it was set by."""
    if not usage_db.strip():  # SQLite's temporary database: usage lost at exit
        raise ConfigError(f"{where}: empty (an unset ${{VAR}}?): give one, or leave it out")
    if _CONNINFO.match(usage_db):
        # Else a SQLite file named after it, its password in the name, shown wherever the ledger is (Health, the log).
        raise ConfigError(
            f"{where}: a libpq key=value connection string is not a ledger this gateway reads; give a"
            " postgresql://user:password@host:5432/dbname URL, or a SQLite file path"
        )
    if _MISTYPED_POSTGRESQL.match(usage_db):
        # Else a SQLite file named after it, its password in the name, shown wherever the ledger is (Health, the log).
        raise ConfigError(
            f"{where}: not a PostgreSQL URL, though it starts as one (a ':' or '/' missing after postgresql?): give a"
            " postgresql://user:password@host:5432/dbname URL, or a SQLite file path"
        )
    if "://" in usage_db and not is_postgresql(usage_db):
        scheme = usage_db.split("://", 1)[0]
        raise ConfigError(
            f"{where}: {scheme}:// is not a ledger this gateway knows; give a SQLite file path or a postgresql:// URL"
        )
    if is_postgresql(usage_db) and _BARE_PERCENT.search(usage_db):
        # libpq would refuse it, and psycopg's pool log its message, the password in it, at every try to connect.
        raise ConfigError(f"{where}: a % in the URL starts no %XX escape; write a % in the password as %25")
    if is_postgresql(usage_db):
        _check_authority(usage_db, where)
        _check_postgresql_options(usage_db, where)
    else:  # a SQLite file, and its journal beside it
        _check_path(usage_db, where)


_SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_redis_options(url: str, where: str) -> None:
    """The URL read as the limiter's client will (its port, database and options), and its options made into a
    connection's (none is opened): an option redis-py does not know, or a value it refuses, failed every call to Redis
    for good while the gateway served on, its limits unenforced (or every call refused). Their words hold no URL."""
    # Imported only where Redis is configured, as the limiter is.
    from redis.asyncio import ConnectionPool, SSLConnection
    from redis.exceptions import RedisError

    try:
        connection = ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except TypeError as exc:  # an option a connection does not take, its name in the words
        option = re.search(r"argument '(\w+)'", str(exc))
        named = f"?{option.group(1)}=" if option else "an option in the URL"
        raise ConfigError(f"{where}: {named} is no option of a Redis connection (redis-py's)") from None
    except (ValueError, RedisError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if isinstance(connection, SSLConnection):
        _check_redis_tls_files(connection, url, where)


def _check_redis_tls_files(connection: Any, url: str, where: str) -> None:
    """The TLS files a rediss:// URL names, read as redis-py reads them at its first connection: one missing, or not
    PEM, failed every call to Redis while the gateway served on, its limits unenforced (or every call refused)."""
    named = [f"?{name}=" for name, _ in parse_qsl(urlsplit(url).query) if name in _REDIS_TLS_FILES]
    files = f"the TLS files it names ({', '.join(named)})"
    try:
        connection.ssl_context.get()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {files}: a file does not exist") from None
    except ssl.SSLError:  # before OSError, which it is
        raise ConfigError(
            f"{where}: {files} cannot be used: each must be PEM, the key the certificate's own, and ?ssl_password="
            " its passphrase where it has one"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where}: {files} cannot be read: {exc.strerror or exc}") from None


_REDIS_TLS_FILES: Final = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")


def _check_postgresql_options(url: str, where: str) -> None:
    """What libpq would refuse at every try to connect, while the gateway served on with its ledger unavailable for
    good: a port that is no number, an sslmode it does not know. (Neither message holds the URL.) The URL may name
    several hosts, each with its port or not, as libpq's are ("db1:5432,db2:5433"), tried in turn."""
    for host in urlsplit(url).netloc.rpartition("@")[2].split(","):
        try:
            port = urlsplit(f"//{host}").port
        except ValueError:  # not a number, or out of range
            port = -1
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{where}: a port in the URL is not a number from 0 to 65535")
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key == "sslmode" and value not in _SSLMODES:
            raise ConfigError(f"{where}: sslmode={value!r} is none of {', '.join(_SSLMODES)}")
    # The rest as libpq reads it: a parameter it does not know (?sslmod=), a space not written %20.
    from psycopg import ProgrammingError  # imported only where PostgreSQL is configured, as the ledger's store is
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except ProgrammingError as exc:
        secrets = _postgresql_secrets(url)

        def shown(quoted: re.Match[str]) -> str:
            """libpq quotes the part it refuses, which may be the password, or hold it."""
            return '"***"' if any(secret in quoted.group(1) for secret in secrets) else quoted.group(0)

        said = re.sub(r'"([^"]*)"', shown, " ".join(str(exc).split()))
        raise ConfigError(f"{where}: libpq refuses the URL: {said}") from None


_SECRET_QUERY_PARAMETERS: Final = frozenset({"password", "sslpassword"})
"""Of libpq's URL parameters, those that hold a secret (as the password before the host does)."""


def _postgresql_secrets(url: str) -> set[str]:
    """The secrets a PostgreSQL URL holds (its password, as `user:password@` or ?password=; ?sslpassword=), as written
    and decoded: libpq's words may quote either."""
    parts = urlsplit(url)
    written = [parts.password] if parts.password else []
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if unquote(key) in _SECRET_QUERY_PARAMETERS and value:
            written.append(value)
    return {form for secret in written for form in (secret, unquote(secret), unquote_plus(secret))}


def _check_authority(url: str, where: str) -> None:
    """A user or password holding '/', '?' or '#' as is ends the URL's authority early: the rest of it, the password
    with it, would be read as the path or the fragment (and shown wherever a database's address is: Health, the log),
    or as the host and port (and quoted in the error). The URL itself is never in the message. So an @ after the
    authority is one, unless in the value of a `user` parameter (`?user=admin@server`, as Azure's users are named)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        if "NFKC" in str(exc):  # its words quote the whole authority, the password with it
            raise ConfigError(
                f"{where}: the user, password or host holds a character that reads as '/', '?', '#', '@' or ':' once"
                " normalized (NFKC); percent-encode it"
            ) from None
        raise ConfigError(f"{where}: {exc}") from None  # its own words ("Invalid IPv6 URL"), never the URL's
    # Whether or not the authority holds an '@' of its own: a password "p@ss/word" ends it at "p@ss", and the rest of
    # the password, "word@host", would be the path. Looked for as written: a query's value may hold one encoded (%40).
    query = [parameter for parameter in parts.query.split("&") if not parameter.startswith("user=")]
    # Two in the authority ("user:p@ss@host"): Python's URL parsing takes the last for the host's, libpq the first,
    # and its error quotes the rest as the host, "ss@host", part of the password.
    if parts.netloc.count("@") > 1 or "@" in parts.path + parts.fragment or any("@" in p for p in query):
        raise ConfigError(
            f"{where}: the user or password in the URL holds a '/', '?', '#' or '@' as is (an '@' follows the host);"
            " percent-encode it (%2F, %3F, %23, %40)"
        )


def _check_state(state: StateConfig, redis_where: str) -> None:
    """`redis_where`: the field that set the Redis URL, or the variable."""
    if state.on_unavailable not in ("allow", "deny"):
        raise ConfigError(
            f"state.on_unavailable: {shown_value(state.on_unavailable, 'state.on_unavailable')} is not allow or deny"
        )
    _check_positive(state, "state")
    if state.redis_url is None:
        return
    if not state.redis_url.strip():
        raise ConfigError(f"{redis_where}: empty (an unset ${{VAR}}?): give a redis:// URL, or leave the field out")
    # The URL may hold a password: only its scheme, or what the parsers say of its form, is shown.
    _check_authority(state.redis_url, redis_where)
    parts = urlsplit(state.redis_url)  # _check_authority has seen that it splits
    if "@" not in parts.netloc:
        try:
            parts.port  # noqa: B018 (reading it validates it)
        except ValueError:
            # Without an '@', what is read as the port may be a password (redis://:PASSWORD, its @HOST left out),
            # which the parser's words would quote.
            raise ConfigError(
                f"{redis_where}: the port is not a number (or, if that is a password, the @HOST after it is missing:"
                " redis://:PASSWORD@HOST:6379/0)"
            ) from None
    scheme = parts.scheme
    if scheme in ("redis", "rediss", "unix"):
        _check_redis_options(state.redis_url, redis_where)
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{redis_where}: scheme {_written_scheme(state.redis_url) or '(none)'} is not redis://, rediss:// or unix://"
        )
    database = parts.path.removeprefix("/")
    if scheme != "unix" and database and not _is_decimal(database):
        # redis-py takes a path that is not a number for database 0, which may be another application's.
        raise ConfigError(f"{redis_where}: the path after HOST:PORT is not a database number (redis://HOST:6379/0)")


def _written_scheme(url: str) -> str | None:
    """The URL's scheme, when one stands before a "://": without one, what a parser takes for it may be a password
    ("PASSWORD:x", the rest of a URL left out)."""
    scheme, separator, _ = url.partition("://")
    return scheme if separator and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else None


MAX_MESSAGE_BYTES = 2**31 - 1
MAX_CONCURRENT_RPCS = 2**31 - 1
MAX_CONNECTION_TIMER_S = 86400.0
"""The longest of the connection timers (keepalive, connection age): gRPC takes them in milliseconds, in a C int."""
MAX_ROUTER_WAIT_S = 86400.0
"""The longest of the router's waits (a circuit's cooldown, a retry's backoff, an upstream's Retry-After honoured)."""
MAX_WORKERS = 1024
MIN_WORKER_TIMEOUT_S = 3.0
"""More processes than a machine has cores only share them; past this, a typo (100000) would fork until it fell."""


def _workers(text: str, where: str) -> int:
    if not _is_decimal(text) or int(text) < 1:
        raise ConfigError(f"{where}: {text!r} is not a number of processes >= 1")
    return int(text)


def load_keys_file(path: str | Path) -> tuple[CallerKey, ...]:
    """The keys of a keys file (`keys: [...]`, as auth.keys); ConfigError naming the field on any mistake.

    The file must say `keys:`, as `keys: []` when it admits nobody. An empty file (or one of blanks and comments) is
    a mistake, not a file without keys: it is what a reload sees of a file saved in place (truncated, then written)
    between the two steps, and taking it at its word would revoke every key until the next look."""
    return read_keys_file(path)[0]


def read_keys_file(path: str | Path) -> tuple[tuple[CallerKey, ...], bytes]:
    """load_keys_file's keys, with the bytes they were read from: a copy of the file as it was taken is these, not
    what the file holds by the time it is copied."""
    where = f"keys file {shown_path(path)}"
    data = _read_bytes(Path(path), where, "check the path in auth.keys_file (or LLMRELAY_KEYS_FILE)")
    return _keys_in(_decoded(data, where), where), data


def _keys_in(text: str, where: str) -> tuple[CallerKey, ...]:
    """The keys of a keys file's `text`, read from `where`."""
    document = _parse_yaml(text, os.environ, where, _KEYS_FILE_HOLDS)
    if document is None:
        raise ConfigError(f"{where}: empty; it must say `keys:` with the list of keys, `keys: []` to admit nobody")
    if "keys" not in document:
        raise ConfigError(f"{where}: the top level must be a mapping{_KEYS_FILE_HOLDS}")
    try:
        keys = _build(_KeysFile, document, "").keys
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None  # the field's path, in the file it is in
    _check_keys(keys, f"{where}: keys")
    return keys


_SHA256 = re.compile(r"[0-9a-f]{64}")
_NO_KEY_SHA256: Final = hashlib.sha256(b"").hexdigest()
"""What `printf %s "$KEY" | sha256sum` prints when $KEY is unset: an entry of it would admit every call without a
key (a call without one is refused before any lookup, but `Bearer ` with nothing after is a key of nothing)."""


def check_key_name(name: str, where: str = "name") -> None:
    if not CALLER_NAME.fullmatch(name):
        raise ConfigError(f"{where}: {shown_value(name, 'name')} must be 1-128 of letters, digits and ._:@/-")


def _check_keys(keys: tuple[CallerKey, ...], where: str) -> None:
    names: set[str] = set()
    digests: dict[str, str] = {}
    for index, key in enumerate(keys):
        at = f"{where}[{index}]"
        check_key_name(key.name, f"{at}.name")
        if key.name in names:
            raise ConfigError(
                f"{at}.name: {shown_value(key.name, 'name')} is already the name of another key; names must be unique"
            )
        names.add(key.name)
        if not _SHA256.fullmatch(key.sha256):
            raise ConfigError(
                f"{at}.sha256: must be the 64 lowercase hex digits of the key's SHA-256"
                " (`llmrelay-server keys new NAME` prints one); never the key itself"
            )
        if key.sha256 == _NO_KEY_SHA256:
            raise ConfigError(
                f"{at}.sha256: is the SHA-256 of nothing (an empty key, as `sha256sum` prints it for an unset"
                " variable), which would admit every caller that sends an empty key; give the digest of the key itself"
                " (`llmrelay-server keys new NAME` prints one)"
            )
        if key.sha256 in digests:
            # One key would be one of the two callers, the other's entry (its models, its limits) silently unused:
            # an entry copied for a new caller whose sha256 was not replaced.
            raise ConfigError(
                f"{at}.sha256: the same as that of key {digests[key.sha256]!r}; each caller needs a key of its own"
                " (`llmrelay-server keys new NAME`)"
            )
        digests[key.sha256] = key.name
        _check_positive(key.limits, f"{at}.limits")


def _backends(llm: _LLMSection, env: Mapping[str, str]) -> tuple[BackendSpec, ...]:
    specs: dict[str, BackendSpec] = {}
    # No key, no OpenAI: the default chain is then Ollama alone, as a local-first setup expects; and Anthropic joins
    # the chain, after OpenAI, only with a key too.
    openai = _hosted("openai", llm.openai, env, _OPENAI_VARIABLES, (DEFAULT_OPENAI_BASE_URL, DEFAULT_OPENAI_MODEL))
    anthropic = _hosted(
        "anthropic", llm.anthropic, env, _ANTHROPIC_VARIABLES, (DEFAULT_ANTHROPIC_BASE_URL, DEFAULT_ANTHROPIC_MODEL)
    )
    specs.update((spec.name, spec) for spec in (openai, anthropic) if spec is not None)
    ollama = _set_or_left_out(llm.ollama or _BackendSection(), "llm.ollama")
    if env.get("OLLAMA_HOST"):
        base_url = ollama_base_url(env["OLLAMA_HOST"])
    else:
        base_url = ollama.base_url or ollama_base_url(DEFAULT_OLLAMA_HOST)
    url_where = "OLLAMA_HOST" if env.get("OLLAMA_HOST") else "llm.ollama.base_url"
    model = env.get("LLMRELAY_OLLAMA_MODEL") or ollama.model or DEFAULT_OLLAMA_MODEL
    model_where = "LLMRELAY_OLLAMA_MODEL" if env.get("LLMRELAY_OLLAMA_MODEL") else None
    specs["ollama"] = _spec(
        "ollama", "ollama", base_url, model, ollama.api_key, ollama, "llm.ollama", url_where, None, model_where
    )
    for index, extra in enumerate(llm.backends):
        where = f"llm.backends[{index}]"
        if extra.kind not in BACKEND_KINDS:
            shown = shown_value(extra.kind, where)
            raise ConfigError(f"{where}.kind: {shown} is not one of {', '.join(BACKEND_KINDS)}")
        if extra.name in specs or not re.fullmatch(r"[a-z][a-z0-9_-]*", extra.name):
            shown = shown_value(extra.name, where)
            raise ConfigError(f"{where}.name: {shown} must be unique and match [a-z][a-z0-9_-]*")
        url_where = f"{where}.base_url"
        specs[extra.name] = _spec(
            extra.name, extra.kind, extra.base_url, extra.model, extra.api_key, extra, where, url_where
        )
    order = llm.order or tuple(specs)
    for index, name in enumerate(order):
        if name not in specs:
            raise ConfigError(
                f"llm.order[{index}]: {shown_value(name, 'llm.order')} is not a configured backend ({', '.join(specs)})"
            )
        if name in order[:index]:
            raise ConfigError(
                f"llm.order[{index}]: {shown_value(name, 'llm.order')} is already in the order; name each backend once"
            )
    return tuple(specs[name] for name in order)


def _check_model_name(model: str, where: str) -> None:
    """A model's name as an upstream and a caller can write it: one with a line break (a YAML block's `|`, a value read
    from a file) went upstream so, every call failing NOT_FOUND, and no caller could name it (callers' names with
    control characters are refused)."""
    if CONTROL_CHARACTERS.search(model):
        raise ConfigError(
            f"{where}: {shown_value(model, where)} holds a line break or another control character (a YAML block's"
            " `|`, or a value read from a file with its newline?); write the name alone"
        )


def _check_alias(alias: str, target: str, aliases: Mapping[str, str], backends: set[str]) -> None:
    """An alias the router can follow: once, to a model a backend may serve (a caller asking for it would otherwise
    be told that no backend serves the model, in a message listing the alias as served)."""
    if not alias or CONTROL_CHARACTERS.search(alias):
        raise ConfigError(
            f"llm.aliases: {shown_value(alias, 'llm.aliases')} is no name a caller can ask for (empty, or holding a"
            " control character)"
        )
    _check_model_name(target, f"llm.aliases.{alias}")
    if target in aliases:
        followed = "itself" if target == alias else f"another alias (of {aliases[target]!r})"
        raise ConfigError(
            f"llm.aliases.{alias}: points at {followed}; an alias is followed once: point it at a model, as"
            " BACKEND/MODEL or a name a backend serves"
        )
    qualifier, slash, model = target.partition("/")
    if slash and (not qualifier or not model):
        raise ConfigError(
            f"llm.aliases.{alias}: points at {shown_value(target, 'llm.aliases')}, which names no backend or no model;"
            " point it at BACKEND/MODEL or a name a backend serves"
        )
    if not slash or qualifier in backends:
        return
    if qualifier in BACKEND_KINDS:
        raise ConfigError(
            f"llm.aliases.{alias}: points at backend {shown_value(qualifier, 'llm.aliases')}, which is not configured"
        )
    # A model's own name may hold a slash (meta-llama/Llama-3-8B): only a near miss of a backend's name is refused.
    if near := difflib.get_close_matches(qualifier, backends, n=1, cutoff=0.75):
        raise ConfigError(
            f"llm.aliases.{alias}: points at {target!r}, and no backend is named {qualifier!r} (did you mean"
            f" {near[0]!r}?); a model whose own name starts so is written BACKEND/{target}"
        )


_OPENAI_VARIABLES: Final = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "LLMRELAY_OPENAI_MODEL")
_ANTHROPIC_VARIABLES: Final = ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "LLMRELAY_ANTHROPIC_MODEL")


def _hosted(
    name: str,
    section: _BackendSection | None,
    env: Mapping[str, str],
    variables: tuple[str, str, str],
    defaults: tuple[str, str],
) -> BackendSpec | None:
    """OpenAI's or Anthropic's backend (`name`, its kind too), from its section and its variables (`variables`: its
    key's, URL's and model's; `defaults`: its URL and model): there with a key, else None. Without one its section is
    checked all the same (a mistake in it stopped the gateway only where the key was set: in production, past
    staging), and its other variables, which other tools share, are not read."""
    section = _set_or_left_out(section or _BackendSection(), f"llm.{name}")
    key_variable, url_variable, model_variable = variables
    api_key = env.get(key_variable) or section.api_key
    if not api_key:
        env = {}
    base_url = env.get(url_variable) or section.base_url or defaults[0]
    spec = _spec(
        name,
        name,
        base_url,
        env.get(model_variable) or section.model or defaults[1],
        api_key,
        section,
        f"llm.{name}",
        url_variable if env.get(url_variable) else f"llm.{name}.base_url",
        key_variable if env.get(key_variable) else None,
        model_variable if env.get(model_variable) else None,
    )
    return spec if api_key else None


def _set_or_left_out(section: _BackendSection, where: str) -> _BackendSection:
    """The section of a backend with a default URL, whose URL is given or left out: set but blank (an unset ${VAR}),
    it was taken for left out, the default in its place, and the section's key and the callers' prompts went to the
    public API (OpenAI's, Anthropic's) rather than the server meant. (A blank model is the default model, of the
    server meant.)"""
    if section.base_url is not None and not section.base_url.strip():
        raise ConfigError(f"{where}.base_url: empty (an unset ${{VAR}}?): give one, or leave the field out")
    return section


def _check_api_key(api_key: str | None, where: str) -> None:
    """A key an HTTP header can carry: it goes out in one on every request (its value is never shown)."""
    if not api_key:
        return
    if any(not (" " <= char <= "~") for char in api_key):
        problem = (
            "has a line break or another control character (a key read from a file with its newline?)"
            if any(char < " " or char == "\x7f" for char in api_key)
            else "has a character outside printable ASCII, which an HTTP header cannot carry"
        )
        raise ConfigError(f"{where}: {problem}; the key is not shown")


def _spec(
    name: str,
    kind: str,
    base_url: str,
    model: str,
    api_key: str | None,
    section: _BackendSection,
    where: str,
    url_where: str,
    key_where: str | None = None,
    model_where: str | None = None,
) -> BackendSpec:
    """A backend from its resolved name, kind, URL, model and key, and the section's routing fields; `where` names
    the section, `url_where` what set the URL (the field, or a variable), `key_where` the variable that set the key
    (None: the section's api_key), `model_where` the variable that set the model (None: the section's model)."""
    _check_api_key(api_key, key_where or f"{where}.api_key")
    if not all(character.isprintable() and not character.isspace() for character in base_url):
        # The HTTP client refuses it at start with a traceback (a control character), or every call fails (a space:
        # a name not found, a path not found). Not shown: it may be a key given as the URL by mistake.
        raise ConfigError(
            f"{url_where}: holds a space or a control character (a line break at its end, read from a file?); give"
            " the URL alone"
        )
    # Read from the text, not the parse, which a password with a `#` or `[` in it breaks.
    if "@" in base_url.partition("://")[2].partition("/")[0]:
        # Never sent (the client authenticates with api_key), and the URL is shown to callers (an unreachable
        # backend's status, Health) and in the log: its password would be too.
        raise ConfigError(
            f"{url_where}: holds a user or password (USER:PASSWORD@), which is never sent; give the key as api_key"
        )
    # The URL is not shown in these errors: a key given as the URL by mistake (`${OPENAI_API_KEY}`) would be.
    example = "write e.g. http://localhost:8080/v1"
    try:
        url = urlsplit(base_url)
        url.port  # noqa: B018 (reading it validates it)
    except ValueError:  # "Invalid IPv6 URL", a port that is no number: its words quote the value
        raise ConfigError(f"{url_where}: not an http(s) URL (its host or port cannot be read); {example}") from None
    if url.scheme not in ("http", "https"):
        written = _written_scheme(base_url)
        scheme = f"its scheme is {written!r}" if written else "it has no scheme"
        raise ConfigError(f"{url_where}: not an http(s) URL ({scheme}); {example}")
    if not url.hostname:
        raise ConfigError(f"{url_where}: not an http(s) URL (it names no host); {example}")
    if url.query or url.fragment or base_url.rstrip().endswith(("?", "#")):
        # The API's paths go after the URL's own (/chat/completions): a query before them would become part of the
        # path, every call a 404. And the URL is shown to callers and in the log: a key in its query would be too.
        raise ConfigError(
            f"{url_where}: has a query or fragment (?... or #...), which the gateway cannot send its requests with;"
            " give the URL up to its path (a key as api_key)"
        )
    if section.context_window is not None and section.context_window <= 0:
        raise ConfigError(f"{where}.context_window: must be > 0 (tokens), or left out when unknown")
    if not model:
        raise ConfigError(f"{where}.model: empty; name the model this backend serves by default")
    _check_model_name(model, model_where or f"{where}.model")
    for field_name, names in (("models", section.models), ("embedding_models", section.embedding_models)):
        for index, listed in enumerate(names):
            _check_model_name(listed, f"{where}.{field_name}[{index}]")
    if section.embedding_model:
        _check_model_name(section.embedding_model, f"{where}.embedding_model")
    if section.max_tokens is not None and kind != "anthropic":
        raise ConfigError(f"{where}.max_tokens: only an anthropic backend takes a default max_tokens; leave it out")
    if section.max_tokens is not None and section.max_tokens <= 0:
        raise ConfigError(f"{where}.max_tokens: must be > 0 (tokens), or left out for the gateway's default")
    if section.embedding_models and not section.embedding_model:
        raise ConfigError(
            f"{where}.embedding_models: the backend serves embeddings only with an embedding_model (the default one);"
            " set that too"
        )
    if section.embedding_model == "":
        raise ConfigError(f"{where}.embedding_model: empty; name the model, or leave the field out")
    if "" in section.embedding_models:
        raise ConfigError(f"{where}.embedding_models[{section.embedding_models.index('')}]: empty; name a model")
    base_url = base_url.rstrip("/")
    if kind == "ollama" and not url.path.strip("/"):
        # Ollama's root, as OLLAMA_HOST and Ollama's own docs write it: its OpenAI API is under /v1 (OLLAMA_HOST is
        # read so too). Taken as it is, its health probes (/api/...) passed and every call was a 404, MODEL_NOT_FOUND.
        base_url += "/v1"
    return BackendSpec(
        name=name,
        kind=kind,
        base_url=base_url,
        default_model=model,
        api_key=api_key or None,
        models=section.models,
        fallback=section.fallback,
        context_window=section.context_window,
        default_max_tokens=section.max_tokens,
        embedding_model=section.embedding_model,
        embedding_models=section.embedding_models,
    )


def ollama_base_url(host: str) -> str:
    """OLLAMA_HOST as Ollama reads it -> the /v1 base URL.

    Like Ollama: spaces and quotes are trimmed; no scheme means http and port 11434; a scheme without a port means
    that scheme's port (80, 443); a bare IPv6 address is allowed; an empty host means localhost; a path is kept (an
    Ollama behind a reverse proxy's prefix: https://proxy/ollama).
    """
    host = host.strip().strip("\"'").strip()
    scheme, separator, rest = host.partition("://")
    if not separator:
        scheme, rest = "http", host
        default_port = 11434
    else:
        default_port = 443 if scheme == "https" else 80
    rest, _, path = rest.partition("/")
    path = path.rstrip("/")
    if rest.count(":") > 1 and not rest.startswith("["):
        rest = f"[{rest}]"  # a bare IPv6 address, with no port
    try:
        url = urlsplit(f"{scheme}://{rest}")
    except ValueError:  # an unclosed [, or what was taken for a bare IPv6 address; its words quote the host
        raise ConfigError("OLLAMA_HOST: not HOST:PORT, :PORT or a URL; write e.g. 127.0.0.1:11434") from None
    hostname = url.hostname or "127.0.0.1"
    # 0.0.0.0 is where Ollama listens, not an address to connect to.
    if hostname in ("0.0.0.0", "::"):
        hostname = "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    try:
        port = url.port or default_port
    except ValueError:  # the value is not quoted: a user part may be a token (http://TOKEN@host)
        raise ConfigError("OLLAMA_HOST: the port is not a number from 0 to 65535; write e.g. 127.0.0.1:11434") from None
    return f"{scheme}://{hostname}:{port}{'/' + path if path else ''}/v1"


# A default holds no "$": a nested ${...} in it is none of the two forms, and is refused, not kept as text.
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}$]*))?\}")
_FROM_THE_ENVIRONMENT: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "_FROM_THE_ENVIRONMENT", default=()
)
"""The values ${VAR} put in the files read (here, in this thread), each with its variable: a mistake names its field
and the variable, never the value (a key in the wrong field's ${VAR}, say)."""


_KEYS_FILE_HOLDS = " with `keys:`, the list of keys (`keys: []` to admit nobody)"


def _read_text(path: Path, where: str, to_find_it: str) -> str:
    return _decoded(_read_bytes(path, where, to_find_it), where)


def _read_bytes(path: Path, where: str, to_find_it: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror}); {to_find_it}") from exc


def _decoded(data: bytes, where: str) -> str:
    """The text of a file's `data`, as Path.read_text reads it: UTF-8, each line ending as "\\n"."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start} cannot be read); save it as UTF-8") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_yaml(text: str, env: Mapping[str, str], where: str, holds: str) -> Mapping[str, Any] | None:
    try:
        document = yaml.load(text, Loader=_Loader)  # a SafeLoader: no tag makes an object
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(exc)}") from None
    except (ValueError, TypeError, KeyError, AttributeError):
        # PyYAML's constructors let these out for a value its explicit tag cannot take (`!!int abc`, `!!bool maybe`,
        # `!!timestamp x`), and their words quote the value, which may be a secret.
        raise ConfigError(f"{where}: not valid YAML: a value that its tag (!!int, !!float, ...) cannot take") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    if document is None:
        return None
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping{holds}")
    # After parsing, not before: a value from the environment (a key, say) is taken literally, whatever characters
    # it has, and can never show up in a YAML syntax error.
    known = _FROM_THE_ENVIRONMENT.get()
    names = {match.group(1) for match in _INTERPOLATION.finditer(text)}
    used = {(env[name], name) for name in names if env.get(name)}
    _FROM_THE_ENVIRONMENT.set(known + tuple(sorted(used - set(known))))
    try:
        interpolated: Mapping[str, Any] = _interpolate(document, env)
    except _UnreadPlaceholderError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    return interpolated


class _WrittenInt(int):
    """A whole number as YAML read it, with the text it was written as (`written`): a field of text takes that text,
    not the number YAML 1.1 made of it (`010` is 8, `1:30` is 90, `0x10` is 16)."""

    written: str


class _WrittenFloat(float):
    """A number with a fraction as YAML read it, with the text it was written as (`1.50`, `.inf`): see _WrittenInt."""

    written: str


def _type_name(value: Any) -> str:
    """A value's type as an error names it: int or float for a number YAML read, not the subclass it made."""
    if isinstance(value, _WrittenInt | _WrittenFloat):
        return type(value).__mro__[1].__name__
    return type(value).__name__


def _as_text(value: str | int | float) -> str:
    """A value a field of text takes: as written, for a number YAML read."""
    return value.written if isinstance(value, _WrittenInt | _WrittenFloat) else str(value)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping, which PyYAML would let the last one win
    silently: a second `server:` section would drop every setting of the first. Its numbers keep the text they were
    written as (_WrittenInt, _WrittenFloat)."""

    def construct_written_int(self, node: yaml.ScalarNode) -> _WrittenInt:
        number = _WrittenInt(self.construct_yaml_int(node))
        number.written = node.value
        return number

    def construct_written_float(self, node: yaml.ScalarNode) -> _WrittenFloat:
        number = _WrittenFloat(self.construct_yaml_float(node))
        number.written = node.value
        return number

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`, whose keys the mapping's own may override: that is what merging is for
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, _WrittenInt | _WrittenFloat):
                key = key.written  # a key is a name: `010` and `8` are two
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key, which the safe loader's own construct_mapping refuses
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice; give each key once",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_written_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_written_float)


def _check_tls(tls: TLSConfig) -> None:
    # An unset ${VAR} reads as empty; an empty client_ca_file would turn mutual TLS off without a word.
    for name in ("cert_file", "key_file", "client_ca_file"):
        value = getattr(tls, name)
        if value is not None and not value.strip():
            leave_out = " (leave it out for no client certificates)" if name == "client_ca_file" else ""
            raise ConfigError(f"server.tls.{name}: empty (an unset ${{VAR}}?): give a file{leave_out}")
        _check_path(value, f"server.tls.{name}")


_YAML_NAME: Final = re.compile(r"(alias|anchor|tag) '[^']*'")
"""A name PyYAML quotes in its problem: an unquoted value that begins with *, & or ! is read as one (a key that
begins with one of them, written unquoted)."""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong, and where, without the text of the line (PyYAML quotes it), which may hold a secret; nor a name
    of an alias, anchor or tag, which may be one too (`api_key: *x9...`)."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return "a syntax error"
    mark = error.problem_mark
    problem, context = (
        _YAML_NAME.sub(r"\1 (not shown: quote a value that begins with *, & or !)", text) if text else text
        for text in (error.problem, error.context)
    )
    context = f" ({context})" if context else ""
    return f"{problem or 'a syntax error'}{context} at line {mark.line + 1}, column {mark.column + 1}"


class _UnreadPlaceholderError(ConfigError):
    """A `${` that is none of the forms the gateway replaces, or where it replaces none (a mapping's key)."""


def _interpolate(value: Any, env: Mapping[str, str], done: dict[int, Any] | None = None, where: str = "") -> Any:
    """${VAR} and ${VAR:-default} in every string of the document, from the environment; any other `${...}` (the
    shell's `${VAR:?message}`, `${VAR-default}`) refused, naming its field (`where`): kept as it is, it would be the
    value itself (a key of that text, a model of that name).

    A list or mapping that YAML aliases (`*name`) is interpolated once, and stays shared: copying it at each alias
    could grow without end (aliases of aliases), and one that contains itself (`&a [*a]`) is refused."""
    if isinstance(value, str):
        if "${" in value and "${" in _INTERPOLATION.sub("", value):
            # Not the text after it, which may be a secret's (a password with "${" in it, written in the file).
            raise _UnreadPlaceholderError(
                f"{where or 'a value'}: holds a ${{...}} that is not replaced: the gateway replaces ${{VAR}} and"
                " ${VAR:-default} alone (the shell's ${VAR:?message} and ${VAR-default}, a default that is a"
                " ${...} itself, are none of them)"
            )
        return _INTERPOLATION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if not isinstance(value, Mapping | list):
        return value
    done = {} if done is None else done
    if id(value) in done:
        if done[id(value)] is None:
            raise ConfigError("a YAML alias (*name) inside the value it names (&name): it would never end")
        return done[id(value)]
    done[id(value)] = None  # being interpolated
    if isinstance(value, Mapping):
        for key in value:
            if isinstance(key, str) and "${" in key:
                # Left as it is, the name would be that text (an alias no caller asks for, a price for no model).
                raise _UnreadPlaceholderError(
                    f"{where or 'the file'}: the key {key!r} holds a ${{...}}, which the gateway replaces in values"
                    " alone; write the name itself"
                )
        result: Any = {k: _interpolate(v, env, done, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    else:
        result = [_interpolate(v, env, done, f"{where}[{i}]") for i, v in enumerate(value)]
    done[id(value)] = result
    return result


T = TypeVar("T")


def _build(cls: type[T], value: Any, where: str) -> T:
    """Builds a config dataclass from YAML data, naming the exact field of any mistake."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_shown_not_text(value, where)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(_unknown_field(str(key), where, fields))
        kwargs[key] = _convert(hints[key], item, path)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required")
    return cls(**kwargs)


_LONGEST_SHOWN_KEY: Final = 40
"""Past this, an unknown key is not shown: no field's name is that long, and a secret may be (a key's value written
as a key of its own)."""


def _unknown_field(key: str, where: str, fields: Mapping[str, Any]) -> str:
    """What an unknown key in the mapping at `where` is. A key that looks like a key and its value run together
    (`api_key=sk-...`, `api_key sk-...`) is not shown, as its value may be a secret: only the section it is in."""
    known = f"known fields here: {', '.join(fields)}"
    section = where or "the top level"
    if "=" in key:
        return f"{section}: a key holding '=' (write `key: value`); {known}"
    if ":" in key:
        return f"{section}: a key holding ':' (write `key: value`, a space after the colon); {known}"
    if any(char.isspace() for char in key):
        return f"{section}: a key holding a space (write `key: value`); {known}"
    if len(key) > _LONGEST_SHOWN_KEY:
        return f"{section}: a key of {len(key)} characters, no field's name; {known}"
    near = difflib.get_close_matches(key, fields, n=1, cutoff=0.75)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    path = f"{where}.{key}" if where else key
    return f"{path}: unknown field{hint}; {known}"


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {shown_value(value, where)}")
        return tuple(_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {_shown_not_text(value, where)}")
        return {_as_text(k): _convert(args[1], v, f"{where}.{_as_text(k)}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, str):
            # A boolean written as ${VAR} arrives as text: read as YAML would have read it in place.
            value = _BOOLEANS.get(value.strip().lower(), value)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {shown_value(value, where)}")
        return value
    if hint in (int, float) and isinstance(value, str):
        # A number written as ${VAR} arrives as text.
        value = _number(value, hint)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {shown_value(value, where)}")
        if abs(value) > _LARGEST_INT:
            # No count or size is near it; a typo's 400 digits stopped the start (or a keys file's reload) with a
            # traceback where the checks take it as a float.
            raise ConfigError(f"{where}: too large a number (at most {_LARGEST_INT})")
        return int(value)  # not the subclass YAML made of it (_WrittenInt)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {shown_value(value, where)}")
        try:
            return float(value)
        except OverflowError:  # a whole number past a float's range (1e308): a typo, never a setting
            raise ConfigError(f"{where}: too large a number") from None
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected text, got {shown_value(value, where)}")
        if isinstance(value, str) and "\0" in value:
            # No setting holds one, and a path with one stops the start with a traceback (a ValueError of os).
            raise ConfigError(f"{where}: holds a NUL character (\\0)")
        return _as_text(value)
    raise TypeError(f"unsupported config type {hint!r} at {where}")


_LARGEST_INT: Final = 2**63 - 1
"""The largest whole number a field takes: what a 64-bit integer holds (the contract's, the ledger's, Redis's)."""

_BOOLEANS: Final = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
"""Text YAML reads as a boolean (its 1.1 words, any case)."""


def _number(text: str, hint: type[int] | type[float]) -> int | float | str:
    try:
        return hint(text.strip())
    except ValueError:
        return text


_MAY_HOLD_A_SECRET: Final = ("key", "secret", "token", "password", "url", "usage_db")
"""Words in a field's path whose value may hold a secret (an API key, a store URL with its password)."""


def _shown_not_text(value: Any, where: str) -> str:
    """A value given where a section (a mapping) was expected: text by its type alone, whatever the field, as the
    section's own secret may be what was written there (`llm: {openai: sk-...}`, `state: redis://:password@...`)."""
    return "text" if isinstance(value, str) else shown_value(value, where)


def shown_value(value: Any, where: str) -> str:
    """A value as an error about the field `where` shows it."""
    # A mistyped secret must not end up in a log line: a value of a field that may hold one, and a list or mapping
    # (a URL written as a list item, say), is shown by its type alone.
    if isinstance(value, list | Mapping) or any(word in where.lower() for word in _MAY_HOLD_A_SECRET):
        name = _type_name(value)
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    if isinstance(value, str):
        for used, name in _FROM_THE_ENVIRONMENT.get():
            # Within a value too (a URL built of ${HOST} and ${PASSWORD}), if long enough to be no word of its own.
            if value == used or (len(used) >= 8 and used in value):
                return f"the value of ${{{name}}} (not shown: it may be a secret)"
    return repr(value)


def shown_path(path: str | os.PathLike[str]) -> str:
    """A file path as an error shows it: the value of a ${VAR} in it written as that ${VAR}, as a variable named by
    mistake (`auth.keys_file: "${OPENAI_API_KEY}"`) may hold a secret. A path is worth showing otherwise: it is what
    the operator looks for."""
    shown = os.fspath(path)
    for used, name in sorted(_FROM_THE_ENVIRONMENT.get(), key=lambda pair: -len(pair[0])):
        # Within the path too (a directory under it), if long enough to be no word of its own.
        if shown == used or (len(used) >= 8 and used in shown):
            shown = shown.replace(used, f"${{{name}}}")
    return shown


def _check_path(path: str | None, where: str) -> None:
    """A file or directory path holding no control character: no path is meant to, and a file's content given for
    its path does (a PEM key through ${VAR}), which an error saying the file cannot be read would show whole."""
    if path is not None and any(char < " " or char == "\x7f" for char in path):
        raise ConfigError(
            f"{where}: holds a line break or another control character (a file's content instead of its path?);"
            " give the file's path, which is not shown"
        )


def _is_decimal(text: str) -> bool:
    """Whether `text` is ASCII digits alone: str.isdigit() also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _is_ipv6_address(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


_HOST_NAME: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _is_listen_host(host: str) -> bool:
    """An address gRPC can listen on: an IPv4 address as written strictly (127.1 and 0177.0.0.1 are not), an IPv6 one
    in brackets, or a host name; not "*", spaces, or an IPv4 address in brackets."""
    if host.startswith("[") and host.endswith("]"):
        return _is_ipv6_address(host[1:-1])
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return _HOST_NAME.fullmatch(host) is not None


def _check_listen(listen: str, where: str) -> None:
    if listen.lower().startswith(("unix:", "unix-abstract:")):
        # gRPC's own addresses for a Unix socket: told before, from their path, that their port was no number.
        raise ConfigError(f"{where}: unix sockets are not served; listen on HOST:PORT (e.g. 127.0.0.1:50051)")
    host, sep, port = listen.rpartition(":")
    if not sep:
        why = "it has no :PORT"
    elif not host:
        why = "it has no HOST"
    elif _is_ipv6_address(host):
        # gRPC reads ::1:0 as the IPv4 address 0.1.0.0 on port 443 (its last colon is not the port's): no such bind.
        raise ConfigError(f"{where}: an IPv6 address takes brackets before its :PORT; write e.g. [::1]:50051")
    elif not _is_listen_host(host):
        # gRPC cannot parse these (it said so in a line of its own, and the start that the address was in use).
        why = "its HOST is no IP address (an IPv6 one in brackets) or host name"
    elif not _is_decimal(port) or not 0 <= int(port) <= 65535:
        why = "its port is not a number from 0 to 65535"
    else:
        return
    # The value not shown: what is no address (a URL, a key, through the wrong ${VAR}) may hold a secret.
    raise ConfigError(f"{where}: not HOST:PORT ({why}); write e.g. 127.0.0.1:50051")


_MAX_USD_PER_MILLION_TOKENS: Final = 1_000_000.0
"""The dearest price taken: a dollar a token, over a thousand times the dearest model's. Costs are micro-USD in 64-bit
integers (the contract's, the ledger's): at a dearer price, a typo's, one long answer could cost more than they hold,
an answer whose cost cannot be sent and a record the ledger cannot store."""


def _check_price(price: Price, where: str) -> None:
    _check_positive(price, where, allow_zero=("prompt", "completion", "cached_prompt", "cache_write_prompt"))
    for f in dataclasses.fields(price):
        value = getattr(price, f.name)
        if value is not None and value > _MAX_USD_PER_MILLION_TOKENS:
            # Whole, or to its last digit: in six digits (1e+06) a price just over the bound read as the bound.
            shown = f"{value:,.0f}" if float(value).is_integer() else repr(float(value))
            raise ConfigError(
                f"{where}.{f.name}: {shown} USD per million tokens is over {_MAX_USD_PER_MILLION_TOKENS:,.0f}"
                " (a dollar a token); prices are USD per million tokens"
            )


def _check_positive(section: Any, where: str, allow_zero: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and f.name not in allow_zero):
            bound = ">= 0" if f.name in allow_zero else "> 0"
            raise ConfigError(f"{where}.{f.name}: must be a finite number {bound}")
