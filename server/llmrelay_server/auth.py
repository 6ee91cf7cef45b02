"""Who is calling: caller keys checked by a server interceptor, for unary and streaming calls alike.

Keys are configured by their SHA-256 only (`auth.keys`, and `auth.keys_file` kept apart and re-read when it changes
or on SIGHUP). A call presents `authorization: Bearer KEY`; the interceptor hashes it and looks the hash up. The
lookup compares digests, not keys: its timing tells nothing about any key, and the hash is compared once more in
constant time. With no keys configured, calls are open, as before. A known key's caller is put in the call's
context (`current_caller`), where the limits interceptor reads its limits and the servicer the identity to bill and
the models allowed, which it hands the router (the router never reads `current_caller`).

A key is never logged, echoed or kept: only its digest is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import fnmatch
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from llmrelay_server.config import AuthConfig, CallerKey, ConfigError, read_keys_file
from llmrelay_server.decoding import COMPLETE, EMBED, STREAM_COMPLETE, invocation_metadata
from llmrelay_server.domain import (
    CALLER_NAME,
    FieldViolation,
    InvalidRequestError,
    ModelFilter,
    UnauthenticatedError,
    UsageNotAllowedError,
    immutable,
)
from llmrelay_server.handlers import Continuation, Handler, Wrappings
from llmrelay_server.metering import current_meter
from llmrelay_server.status import abort
from llmrelay_server.threads import in_daemon_thread

log = logging.getLogger(__name__)

KEY_PREFIX = "llmr-"
# How often the keys file's modification time is looked at: a key revoked on disk stops working within this.
KEYS_FILE_CHECK_S = 1.0
LIMITS_PER_WORKER = (
    "each worker of this gateway would enforce alone (up to one limit per worker): set state.redis_url to share them,"
    " or run one worker"
)
"""Why several workers without Redis take no keys file that gives a key limits (`KeyRing`'s limits_refused)."""


@immutable
class Caller:
    """A caller the gateway knows by its key."""

    key: CallerKey

    @property
    def name(self) -> str:
        return self.key.name

    def may_use(self, model: str) -> bool:
        """Whether the key may have `model` ("gpt-4o", or backend-qualified "ollama/tiny") answer."""
        return not self.key.models or _any_of(self.key.models).match(model) is not None

    def usage_of(self, requested: str | None) -> str | None:
        """Whose usage GetUsage shows the key when it asks for `requested`'s (None: everyone's): its own only, unless
        it may read all (read_all_usage). A team's key would otherwise see every other team's names and spend."""
        if self.key.read_all_usage:
            return requested
        if requested is not None and requested != self.name:
            raise UsageNotAllowedError(self.name, requested)
        return self.name


@functools.lru_cache(maxsize=1024)
def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """The key's model patterns as one expression: what fnmatchcase would say of each, in one match (a call asks it
    of a route's two names, and of every route a reservation is priced among)."""
    return re.compile("|".join(map(fnmatch.translate, patterns)))


current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("llmrelay_caller", default=None)
"""The authenticated caller of the call in progress; None when keys are off or the service is open."""


_keys_required: contextvars.ContextVar[bool] = contextvars.ContextVar("llmrelay_keys_required", default=False)
"""Whether the call in progress came through the auth interceptor, which is there when keys are on."""


CALLER_HEADER = "x-llmrelay-caller"
"""The metadata by which a caller without a key names itself for the ledger."""


def caller_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who to bill: the key's name when keys are on (a keyed caller cannot bill itself as someone else); else the
    caller's own tag (only when keys are off), else a fingerprint of its bearer token (never the token), else
    anonymous."""
    if (caller := current_caller.get()) is not None:
        return caller.key.name  # Caller.name's, without its frame: asked twice a call (its billing, its log line)
    meter = current_meter.get()
    if meter is None:
        return _identity(context)
    if meter.caller is None:  # read once a call: the call log asks again at the end
        meter.caller = _identity(context)
    return meter.caller


def _identity(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    # A key sent twice counts by its first value, as _bearer reads `authorization`: one rule for every reader of the
    # call's metadata.
    metadata: dict[str, str | bytes] = {}
    for key, value in invocation_metadata(context):
        metadata.setdefault(key, value)
    tag = metadata.get(CALLER_HEADER)
    # With keys on, a call without a known key (refused, or to an open service) proves no name: taking the one it
    # gives would put a key's name on a stranger's calls in the call log (`caller=research code=UNAUTHENTICATED`).
    if tag is not None and not _keys_required.get():
        if not isinstance(tag, str) or not CALLER_NAME.fullmatch(tag):
            raise InvalidRequestError(
                [FieldViolation(f"metadata.{CALLER_HEADER}", "1-128 characters of letters, digits and ._:@/-")]
            )
        return tag
    authorization = metadata.get("authorization")
    if isinstance(authorization, str) and authorization:
        # The token's, however its header is written (`bearer`, two spaces): one token is one caller, found by the
        # start of the `sha256:` a key's entry has.
        token = _token_of(authorization) or authorization
        return "key-" + hashlib.sha256(token.encode()).hexdigest()[:12]
    return "anonymous"


def models_allowed() -> ModelFilter | None:
    """The models the call's key may use (None: any, as for a call without a key)."""
    caller = current_caller.get()
    return caller.may_use if caller is not None else None


def new_key() -> tuple[str, str]:
    """A new random key and its SHA-256 in hex."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, digest(key)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The keys in force: the configuration's, and the keys file's as last read."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        limits_refused: str | None = None,
        keep: Path | None = None,
        on_taken: Callable[[], None] | None = None,
        quiet: bool = False,
    ) -> None:
        """`limits_refused`: why a keys file that gives a key limits cannot be taken, when it cannot (the configuration
        refuses such keys at start for the same reason). `keep`: where to keep a copy of the keys file as last taken,
        and `on_taken`, what to do each time a re-read is taken (a supervisor's: its workers serve that copy, see
        workers.Supervisor). `quiet`: a worker's, which says nothing of the keys its file holds: its supervisor says it
        once, of the operator's file, where each worker would repeat it of a copy in a folder of its own."""
        self._configured = config.keys
        self._limits_refused = limits_refused
        self._keep = keep
        self._on_taken = on_taken
        self._file = Path(config.keys_file) if config.keys_file else None
        self._file_stamp = _stamp(self._file) if self._file else None
        self._quiet = quiet
        if self._file is not None:
            keys, self._by_digest = _read_keys(self._configured, self._file, limits_refused, keep)
            if not self._by_digest and not quiet:  # as at a re-read: a file to be filled later, a placeholder secret
                log.warning(
                    "keys file %s holds no keys, nor auth.keys: every call that needs a key is refused", self._file
                )
        else:
            keys, self._by_digest = (), _by_digest(self._configured)
        self._names = frozenset(key.name for key in (*self._configured, *keys))
        self._named = self._names
        """The names of every key in force since the gateway started: a call may be billed after a re-read took its
        key away."""
        self.catch_up_budgets: Callable[[frozenset[str]], Awaitable[None]] | None = None
        """Brings the limits up to what the named keys spent today, before a re-read gives them a daily budget they
        had not (set by the gateway once it has its limiter and ledger): counted from the re-read on, a key would get
        its whole budget again, where a restart reads what it spent from the ledger."""
        self.calls_in_progress: dict[asyncio.Task[Any], None] = {}
        """The calls of keys in progress, from their handler's start (kept by the auth interceptor while a keys file
        may change the keys). A key's calls begun before a re-read gave it a budget reserved none of it, and are
        billed to the ledger alone: caught up with once they have ended."""
        self._watcher: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Future[None]] = set()
        """The re-reads running or waiting, and the catching up with the spend of calls in progress at one."""
        self._stopped = False
        """Set by stop(): a SIGHUP as the gateway stops reads nothing, to put in force over a ledger being closed."""
        self._waiting: asyncio.Future[None] | None = None
        """The re-read waiting for the running one to end, if any: every reload asked meanwhile is that one."""
        self._reloading = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        """Whether calls need a key: some key is configured, or a keys file is (even one emptied for now)."""
        return bool(self._configured) or self._file is not None

    @property
    def reloads(self) -> bool:
        """Whether the keys in force may change while the gateway serves: a keys file is re-read."""
        return self._file is not None

    def names(self) -> frozenset[str]:
        """The names of the keys in force."""
        return self._names

    def named(self) -> frozenset[str]:
        """The names of every key in force since the gateway started."""
        return self._named

    def budgeted(self) -> frozenset[str]:
        """The names of the keys in force that have a daily budget."""
        return _budgeted(caller.key for caller in self._by_digest.values())

    def find(self, key: str) -> Caller | None:
        """The caller whose key this is, when it is in force."""
        wanted = digest(key)
        found = self._by_digest.get(wanted)
        return found if found is not None and hmac.compare_digest(found.key.sha256, wanted) else None

    def in_force(self, caller: Caller) -> Caller | None:
        """The caller of `caller`'s key as the keys in force have it: `caller` itself unless a re-read came since it
        was found (its limits or models may be others), None once the key is revoked."""
        return self._by_digest.get(caller.key.sha256)

    def reload(self) -> None:
        """SIGHUP: reads the keys file again, in a thread (thousands of keys take seconds to read, which the calls
        in flight must not wait out), then puts it in force. A broken file (an empty one too: see load_keys_file)
        keeps the keys in force and says why, once per change of the file. Reloads asked while one runs are merged
        into one that follows it: a burst of SIGHUPs reads the file twice at most, not once each."""
        if self._stopped:
            return
        if self._file is None:
            # Only SIGHUP asks then, sent by an operator who may expect an edited configuration to be in force.
            log.warning(
                "SIGHUP: no keys file (auth.keys_file) to re-read; the rest of the configuration is read at start"
                " only: restart to apply a change"
            )
            return
        self._reread()

    def _reread(self) -> asyncio.Future[None]:
        """The next re-read: the one already waiting, if any, which reads the file as it is when it starts, so it
        takes this change too."""
        if self._waiting is None or self._waiting.done():
            self._waiting = self._track(self._reload())
        return self._waiting

    def _track(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Runs `work` as one of `_reloads`, which stop() ends."""
        self._reloads.add(running := asyncio.ensure_future(work))
        running.add_done_callback(self._reloads.discard)
        return running

    async def _catch_up_after(
        self,
        calls: Collection[asyncio.Future[Any]],
        names: frozenset[str],
        catch_up: Callable[[frozenset[str]], Awaitable[None]],
    ) -> None:
        """The limits caught up again with what the named keys spent today, which no reservation counted: at once,
        for the calls of theirs that ended while the reload read it; and once `calls` have ended, for theirs."""
        await catch_up(names)
        if calls:
            await asyncio.wait(calls)
            await catch_up(names)
            log.info(
                "keys file %s: the %d calls in progress when it gave %s a daily budget have ended; their spend counts",
                self._file,
                len(calls),
                ", ".join(sorted(names)),
            )

    async def _reload(self) -> None:
        async with self._reloading:  # one at a time: a later read is put in force after an earlier one
            self._waiting = None  # running: a reload asked from now on reads the file again after this one
            try:
                await self._read_file()
            except Exception:
                # A bug of the gateway's own; the watch goes on, or no later change (a revocation) would count.
                log.exception("keys file %s not reloaded, the keys in force stay", self._file)

    async def _read_file(self) -> None:
        assert self._file is not None
        self._file_stamp = _stamp(self._file)
        read = functools.partial(_read_keys, self._configured, self._file, self._limits_refused, self._keep)
        try:
            keys, callers = await in_daemon_thread(read, "llmrelay-keys-file")
        except ConfigError as error:
            log.warning("keys file not reloaded, the keys in force stay: %s", error)
            return
        given = _budgeted((*self._configured, *keys)) - self.budgeted()
        catch_up = self.catch_up_budgets if given else None
        if catch_up is not None:
            before = list(self.calls_in_progress)
            await catch_up(given)  # before the keys are in force: none of their calls passes unseen
            # Calls that began while it read (a ledger of millions of rows takes seconds) began under the keys still
            # in force, reserving nothing: those ended already are counted by a read again at once, those still going
            # as those before it, once they end. No await from here to the keys' swap.
            uncounted = {*before, *self.calls_in_progress}
        if not self._quiet:  # a worker's copy: the supervisor says it, of the operator's file
            self._say_renamed(callers)
        self._by_digest, self._names = callers, frozenset(key.name for key in (*self._configured, *keys))
        self._named |= self._names
        if catch_up is not None:
            self._track(self._catch_up_after(uncounted, given, catch_up))
        if not self._quiet:
            if not self._by_digest:
                # Meant (`keys: []`) or not, every call that needs a key is refused from now on: an operator must hear.
                log.warning(
                    "keys file %s reloaded: no keys in force, every call that needs a key is refused", self._file
                )
            else:
                log.info("keys file %s reloaded: %d keys in force", self._file, len(self._by_digest))
        if self._on_taken is not None:
            self._on_taken()

    def _say_renamed(self, callers: dict[str, Caller]) -> None:
        """A WARNING for each key in force that `callers` names otherwise: limits, budgets and the ledger know a caller
        by its key's name, and an operator tidying names must hear that it starts anew."""
        for digest, caller in callers.items():
            if (was := self._by_digest.get(digest)) is not None and was.name != caller.name:
                log.warning(
                    "keys file %s: key %r is now named %r: its limits and today's budget start anew under that name,"
                    " and its usage is billed to it from now on",
                    self._file,
                    was.name,
                    caller.name,
                )

    def start(self) -> None:
        """Watches the keys file for changes (and SIGHUP, where the process has a main loop to take it)."""
        if self._file is None:
            return
        self._watcher = asyncio.create_task(self._watch(), name="llmrelay-keys-file")

    async def stop(self) -> None:
        self._stopped = True
        tasks = [*self._reloads, *([self._watcher] if self._watcher is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self) -> None:
        assert self._file is not None
        seen = self._file_stamp
        while True:
            await asyncio.sleep(KEYS_FILE_CHECK_S)
            stamp = _stamp(self._file)
            # Taken once it has stayed as it is for a look: a file written in place in several writes is not taken
            # half written (a valid YAML list of the first keys would revoke the rest until the next look).
            if stamp != self._file_stamp and stamp == seen:
                await self._reread()
            seen = stamp


def _stamp(path: Path) -> tuple[int, int, int, int, int] | None:
    """What tells the file changed. Not its time and size alone: a file put in its place with the old one's time
    (`cp -p`, `rsync -t`, a second's timestamps) and as many bytes (a sha256 for another) changes neither, while a
    rename brings another inode and a write sets the change time, which no one sets by hand."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size


def _budgeted(keys: Iterable[CallerKey]) -> frozenset[str]:
    return frozenset(key.name for key in keys if key.limits.budget_usd_per_day is not None)


def _by_digest(keys: Sequence[CallerKey]) -> dict[str, Caller]:
    """The callers by their keys' digests; ConfigError for one digest under two names (each source refuses that
    within itself, so here it is a key of auth.keys given again in the keys file for another caller)."""
    callers: dict[str, Caller] = {}
    named: dict[str, CallerKey] = {}
    for key in keys:
        same_name = named.setdefault(key.name, key)
        if (same_name.models, same_name.limits, same_name.read_all_usage) != (
            key.models,
            key.limits,
            key.read_all_usage,
        ):
            # One name is one caller: billed, limited (one counter) and reading usage as one. Two entries of it that
            # say different things would let one key's holder take the other's rights; the same entry with another
            # digest is a key being rotated.
            raise ConfigError(
                f"key {key.name!r} is in auth.keys and the keys file with other models, limits or read_all_usage;"
                " one name is one caller: give both entries the same (a key being rotated), or another name"
            )
        other = callers.get(key.sha256)
        if other is not None and other.name != key.name:
            # Which of the two would a call with that key be? Billed, limited and allowed models as one, silently.
            raise ConfigError(
                f"key {key.name!r} in the keys file has the same sha256 as key {other.name!r} in auth.keys; each"
                " caller needs a key of its own (`llmrelay-server keys new NAME`)"
            )
        callers[key.sha256] = Caller(key)
    for name, times in collections.Counter(key.name for key in keys).items():
        if times > 1:
            log.warning("key %r is configured twice (in the config and the keys file); both digests are in force", name)
    return callers


def _read_keys(
    configured: tuple[CallerKey, ...], path: Path, limits_refused: str | None, keep: Path | None
) -> tuple[tuple[CallerKey, ...], dict[str, Caller]]:
    """The keys file's keys, and the callers of those and the configured ones by digest; ConfigError when they cannot
    be taken (as _by_digest, or limits that `limits_refused` says why not). With `keep`, the file as it was read is
    copied there, once taken: the bytes taken, not what the file holds by then. All of the reading, for a thread."""
    keys, data = read_keys_file(path)
    limited = [key.name for key in keys if key.limits.any_set()]
    if limited and limits_refused is not None:
        raise ConfigError(f"it gives limits to {', '.join(map(repr, limited))}, which {limits_refused}")
    callers = _by_digest(configured + keys)
    if keep is not None:
        scratch = keep.with_name(f".{keep.name}.new")
        scratch.write_bytes(data)
        scratch.replace(keep)  # whole or not at all, for a worker starting at any moment
    return keys, callers


_MODEL_METHODS = frozenset({COMPLETE, STREAM_COMPLETE, EMBED})
"""The methods whose calls a budget counts."""

_NOT_VALID = "the key is not valid here (unknown, revoked, or not `Bearer KEY`)"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits calls with a known key (or to an open service) and names their caller; refuses the rest.

    gRPC asks for a call's handler when its headers come, and runs it when its request has come, which may be any time
    later: while a keys file may change the keys, the handler looks at the key again as it starts, so that a key
    revoked meanwhile is refused and one whose limits changed is held to its new ones (`key_limits_change` of the
    limits interceptor)."""

    def __init__(self, keys: KeyRing, open_services: Sequence[str]) -> None:
        self._keys = keys
        self._open = frozenset(open_services)
        self._refusing: dict[tuple[str, str], tuple[Handler, Handler]] = {}
        """By method and reason: the handler refused, and its refusal."""
        self._rechecked = Wrappings(functools.partial(self._in_progress, recheck=True))
        self._counted = Wrappings(functools.partial(self._in_progress, recheck=False))

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method  # "/package.Service/Method"
        if not self._keys.enabled:
            return await continuation(handler_call_details)
        _keys_required.set(True)
        key = _bearer(handler_call_details.invocation_metadata)
        caller = self._keys.find(key) if key else None
        if method[1:].rpartition("/")[0] in self._open or method[1:] in self._open:
            # Open to a caller without a (known) key; one with a key is that key's caller there too: billed, limited
            # and shown its usage as its key's, not under a fingerprint of its token. Not looked at again as the
            # handler starts: a key revoked meanwhile would refuse what is open. Its model calls are among the calls
            # in progress, as the key's others, which a reload giving the key a budget waits for (not a Watch, which
            # lasts).
            current_caller.set(caller)
            handler = await continuation(handler_call_details)
            if caller is None or handler is None or not self._keys.reloads or method not in _MODEL_METHODS:
                return handler
            return self._counted.of(handler, method)
        if caller is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            # Made once per method and reason, as the handlers this one passes on are: the observing interceptor keeps
            # its wrapping of each handler it is given, for the calls to come.
            why = _why_not(handler_call_details.invocation_metadata)
            kept = self._refusing.get((method, why))
            if kept is None or kept[0] is not handler:
                kept = self._refusing[method, why] = (handler, _refusing(handler, why))
            return kept[1]
        # Before the interceptors after this one run: they (limits) and the servicer read who is calling.
        current_caller.set(caller)
        handler = await continuation(handler_call_details)
        # A handler of streamed requests starts at once, with the keys that found its caller.
        if handler is None or not self._keys.reloads or handler.request_streaming:
            return handler
        return self._rechecked.of(handler, method)

    def _in_progress(self, handler: Handler, method: str, *, recheck: bool) -> Handler:
        """`handler`, kept among the calls in progress while it runs (`KeyRing.calls_in_progress`); with `recheck`, run
        for its caller as the keys in force when it starts have it (the limits interceptor after this one decides then
        too)."""
        keys, running = self._keys, self._keys.calls_in_progress
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.response_streaming:
            answers_of: Any = handler.unary_stream  # the stubs' type is of grpc's sync server

            async def kept_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                running[task := _current_task()] = None
                try:
                    if recheck:
                        await _as_in_force(keys, context)
                    else:
                        _in_force_if_kept(keys)
                    async with contextlib.aclosing(answers_of(request, context)) as answers:
                        async for answer in answers:
                            yield answer
                finally:
                    running.pop(task, None)

            return grpc.unary_stream_rpc_method_handler(kept_stream, decode, encode)
        answer_of: Any = handler.unary_unary

        async def kept(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            running[task := _current_task()] = None
            try:
                if recheck:
                    await _as_in_force(keys, context)
                else:
                    _in_force_if_kept(keys)
                return await answer_of(request, context)
            finally:
                running.pop(task, None)

        return grpc.unary_unary_rpc_method_handler(kept, decode, encode)


async def _as_in_force(keys: KeyRing, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """The call's caller as the keys in force have it now, a re-read having perhaps come since the call's headers
    were: its key's limits and models as they are now; UNAUTHENTICATED if the key was revoked."""
    caller = current_caller.get()
    assert caller is not None, "set as its handler was found"
    if (now := keys.in_force(caller)) is not caller:
        if now is None:
            await abort(context, f"call from {context.peer()}", UnauthenticatedError(_NOT_VALID))
        current_caller.set(now)


def _in_force_if_kept(keys: KeyRing) -> None:
    """The call's caller (of an open method) as the keys in force have it now, if they still have it: a re-read since
    its headers may have given it a budget, which it must reserve of; one that revoked it leaves it as it came, the
    method open to anyone."""
    caller = current_caller.get()
    if caller is not None and (now := keys.in_force(caller)) is not None and now is not caller:
        current_caller.set(now)


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            return _token_of(value)
    return None


def _token_of(authorization: str) -> str | None:
    """The token of an `authorization` value that is `Bearer TOKEN` (the scheme in any case, spaces around the token
    not its own); None for any other."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _why_not(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    if not any(name == "authorization" for name, _ in metadata or ()):
        return "no key: send the metadata `authorization: Bearer KEY`"
    return _NOT_VALID


def _refusing(handler: Handler, why: str) -> Handler:
    """A handler of the same shape that ends the call UNAUTHENTICATED, saying `why`, the request unread."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, f"call from {context.peer()}", UnauthenticatedError(why))

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(request, context)
        yield  # an async generator, as gRPC expects of a streaming handler

    # Of the handler's kind, which the observers count it as (a refused reflection call is a bidi_stream); where
    # requests stream, `request` is their stream, left unread.
    decode, encode = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream, decode, encode)
        return grpc.stream_unary_rpc_method_handler(refuse, decode, encode)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, decode, encode)
    return grpc.unary_unary_rpc_method_handler(refuse, decode, encode)


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None, "a handler runs in its call's task"
    return task
