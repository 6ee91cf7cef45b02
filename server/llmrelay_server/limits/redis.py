"""Limits kept in Redis (or Valkey), shared by every gateway that names the same one (state.redis_url).

One call, one round trip: a Lua script checks every limit of every subject of the call and then counts it in all of
them, or in none. Redis runs a script alone, so N gateways admit exactly what one would. The script reads Redis's
own clock (TIME), so gateways whose clocks disagree still share one minute and one UTC day.

Per subject, under `llmrelay:limits:SUBJECT:`, only for the limits it has (so a limit a keys file adds counts from
then on, and a daily budget from the day's spend in the ledger: `spend_at_least`). The subject "gateway"
(server.limits) is one over every gateway sharing the Redis, as a caller's key is.

- `requests`, `tokens`: hashes of per-second buckets (the Unix second -> requests, tokens). A bucket counts while it
  is one of the last 61 seconds, so the window is 60 to 61 s: never shorter than a minute, and at most one second
  longer. Buckets rather than a sorted set of calls: a check reads at most 61 fields whatever the rate, and the
  memory of a subject is bounded, where a set would hold every call of the last minute (and its tokens beside it).
- `streams`: a sorted set of the open streams' leases, scored by when they expire (Redis's clock, ms). The gateway
  serving a stream renews the leases of all its open streams in one script call every third of a lease
  (`STREAM_LEASE_S`); a gateway that dies (kill -9, a lost host) stops renewing, so its slots free at most
  `STREAM_LEASE_S` after its last renewal. A renewal brings back the lease of a stream that is still open and not
  settled whatever took it away (it lapsed through an outage longer than a lease, or Redis lost it in a restart or a
  flush): that stream is counted again, so that its key is not given a stream more than its limit. It never brings
  back a settled one: the settle marks the reservation's record, and the renewal reads the mark.
- `spend`: a hash, UTC day -> micro-USD; today's and yesterday's are kept (a call that began before midnight
  settles after it). What a call in progress reserved of it is held on a lease as a stream slot is (`held-leases`,
  and what each holds in `held`), renewed with the streams': the spend of a gateway that dies is taken back by the
  next reservation (of any gateway) after its lease lapsed, rather than staying spent until the end of the day. Its
  record says so (":lapsed", for two days), so that the settle of a call whose gateway was only cut off from Redis
  adds what the call was billed, and an undo takes no spend back a second time.

Every key expires when it is left alone (two minutes; two lease lengths; two days), so nothing grows forever. A key
under the prefix of another kind than the scripts keep there (written by hand, by a tool, by another application) is
deleted when a script meets it, and the script sent again, with a WARNING naming it: its subject's counts start anew,
where it would otherwise fail every call of every subject as Redis unreachable.

A reservation whose answer never reached the gateway (slower than state.timeout_s, a connection lost after the
script was sent, a call cancelled while it waited) may still be counted by Redis later, when the script reaches it:
counted for a call that was admitted uncounted or refused, it would never be settled, and would refuse others until
it left its window (its spend, until the day's end). So every reservation has an id, and the script leaves a record
under `llmrelay:limits:reservation:ID` of the second it counted in (for two minutes). The gateway sends an undo for
each reservation it gave up on, as soon as Redis answers again; the undo works in either order. After the
reservation, it takes back exactly what the record says was counted. Before it, it leaves a tombstone (ten minutes)
that makes the late reservation count nothing. An undo that comes more than two minutes after its reservation ran
finds no record and takes nothing back; by then the reservation's requests and tokens have left their window.

Redis names what it holds with an epoch (`llmrelay:limits:epoch`, the Redis clock's reading when a reservation found
none), which each reservation carries. A Redis restarted without persistence, or flushed, has lost the epoch
with the counts: a settle of a reservation from before corrects nothing, since what it would take back (a call billed
less than it reserved) is no longer counted, and taking it from the calls counted since would let others spend what
those reserved.

A settle (what the call was billed, and its stream slot freed, which would otherwise stay taken until its lease
lapsed) that cannot be sent, or whose answer never came, is kept with the undos and sent with them, in order, before
calls are counted again: so what Redis counts becomes what was billed, however the outage fell. A settle may thus
reach Redis twice (it ran, and its answer was lost): it marks the reservation's record "settled" (for two minutes),
and one that finds the mark changes nothing. Sent again more than two minutes after it ran (its answer lost at the
start of an outage that long), it would correct a second time. At most `MAX_KEPT` undos and settles are kept; past
that, the reservations of the calls that end stay counted (the requests and tokens for their minute, the spend until
the end of the UTC day while the gateway renews its held lease), and a WARNING says so. A settle's held spend is
renewed until the settle has run (kept or dropped), not from when the call ended: a lease that lapsed would give the
spend back, and a settle never sent would not add what was billed. Undos and settles still kept when the gateway
stops, Redis out of reach, are lost: their leases lapse within `STREAM_LEASE_S` and their spend is given back.

When Redis cannot be reached (refused, reset, slower than state.timeout_s, a password it refuses), the gateway goes
on per state.on_unavailable: "allow" admits calls without counting them, "deny" refuses them with UNAVAILABLE. It
then leaves Redis alone, probing it every `PROBE_INTERVAL_S` in the background, so calls do not each wait out the
timeout, and uses it again as soon as a probe succeeds: one WARNING when it goes, one INFO when it is back. What
Redis lost meanwhile (a restart without persistence) starts again from zero. A gateway with no call and no stream
finds Redis gone within a third of a lease all the same: the renewal's tick, with no lease to renew, probes it. The
URL's password never appears in a log line, an error or `health()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, AuthorizationError, OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from llmrelay_server.domain import LimitKind, LimitsUnavailableError, StoreHealth, StoreRole, immutable
from llmrelay_server.limits.interface import (
    STREAM_RETRY_S,
    Ask,
    Reservation,
    budget_usd_micros,
    refusal,
    refuse_oversized,
)

KEY_PREFIX: Final = "llmrelay:limits:"
STREAM_LEASE_S: Final = 15.0
"""How long a stream slot outlives the last renewal by the gateway serving the stream."""
PROBE_INTERVAL_S: Final = 1.0
"""While Redis is unreachable: how often it is probed, and the retry delay of calls refused meanwhile."""
EPOCH_KEY: Final = f"{KEY_PREFIX}epoch"
"""Made by the first reservation into an empty Redis: one that changed since a reservation, Redis lost it."""
PROBE_KEY: Final = f"{KEY_PREFIX}probe"
"""Written (for a second) by the probe (`_PROBE`): a Redis that answers PING but refuses writes cannot count calls."""
RECORD_PREFIX: Final = f"{KEY_PREFIX}reservation:"
"""Per reservation: the second it was counted in (two minutes; then ":lapsed" after it for two days, once its held
spend was taken back), "settled" (two minutes from its settle), or "undone" (a tombstone, ten minutes)."""
HELD_LEASES_KEY: Final = f"{KEY_PREFIX}held-leases"
"""The leases of the reservations that hold spend, scored by when they expire (Redis's clock, ms)."""
HELD_KEY: Final = f"{KEY_PREFIX}held"
"""The spend each of them holds, by reservation id: its second and day, then each spend key and its amount."""
MAX_KEPT: Final = 10_000
"""Undos and settles kept while Redis cannot be reached: one per call this gateway had in flight when Redis went, at
most (calls admitted meanwhile are not counted, so they have none)."""
MAX_CONNECTIONS: Final = 64
"""Commands in flight to Redis at once: a burst of calls queues for a connection (within state.timeout_s) instead of
opening hundreds of connections, each with its handshake (TLS, AUTH), at the moment Redis is busiest."""

# OSError covers TimeoutError, which asyncio.timeout raises. TypeError and AttributeError: redis-py's asyncio client
# lets the transport's own errors out when it writes to a connection the server has reset (redis/redis-py#4287), so a
# Redis that went away must not become an UNKNOWN for the caller, nor end the probe that waits for its return.
_UNREACHABLE: Final = (RedisError, OSError, TypeError, AttributeError)
# A connection found broken (closed by the server, reset, or the transport's errors above): a command is sent once more,
# on a new connection. Every command here may run twice: each script changes nothing the second time it runs for the
# same reservation (or renews, or probes, again). Not a timeout (Redis may be busy with it), nor a password refused.
_BROKEN_CONNECTION: Final = (RedisConnectionError, ConnectionError, TypeError, AttributeError)
# The limits in the order the script checks them (its codes are 1-based positions here), as InProcessLimiter does.
_KINDS: Final = (
    LimitKind.REQUESTS_PER_MINUTE,
    LimitKind.TOKENS_PER_MINUTE,
    LimitKind.CONCURRENT_STREAMS,
    LimitKind.BUDGET_PER_DAY,
)

# The kind of value each key holds, as TYPE names it: the epoch, the probe's key and the records strings, the held
# spends' leases and each subject's streams sorted sets, the rest hashes (the held spends, each subject's requests,
# tokens and spend).
_KIND_OF: Final = f"""
local function kind_of(key)
  if key == '{EPOCH_KEY}' or key == '{PROBE_KEY}' or string.sub(key, 1, {len(RECORD_PREFIX)}) == '{RECORD_PREFIX}' then
    return 'string'
  end
  if key == '{HELD_LEASES_KEY}' or string.sub(key, -8) == ':streams' then return 'zset' end
  return 'hash'
end
"""

# First in every script that writes: a key of another kind (written by hand, by a tool, by another application)
# failed the script part-way, Redis keeping what it had written until then (a record marked as run among it), so that
# sent again once the key was mended it did nothing. Refused before anything is written, the gateway deletes the key
# and sends it again (`RedisLimiter._run`).
_KINDS_CHECKED: Final = (
    _KIND_OF
    + """
do
  local wrong = {}
  for _, key in ipairs(KEYS) do
    local kind = redis.call('TYPE', key).ok
    if kind ~= 'none' and kind ~= kind_of(key) then wrong[#wrong + 1] = key end
  end
  if #wrong > 0 then return redis.error_reply('WRONGTYPE ' .. table.concat(wrong, ' ')) end
end
"""
)

# The spend held by reservations still running, of the `held` hash (HELD_KEY), which the script names `held`.
_HELD_ON: Final = """
-- Spend key -> the micro-USD of `day` that reservations still running hold in it: theirs until they settle.
local function held_on(day)
  local amounts = {}
  for _, entry in ipairs(redis.call('HVALS', held)) do
    local spent = cjson.decode(entry)
    if spent[2] == day then
      for i = 3, #spent, 2 do amounts[spent[i]] = (amounts[spent[i]] or 0) + spent[i + 1] end
    end
  end
  return amounts
end
"""

# What the reserve and undo scripts both read: they are given the same keys and arguments.
_RESERVATION: Final = (
    """
-- KEYS: 4 per subject: requests, tokens, streams, spend; then the epoch, the held spends' leases and the held spends;
-- last, the reservation's record.
-- ARGV[1]: the reservation's id, also its leases', ARGV[2]: a lease's length in ms; then 7 per subject: its
-- requests per minute, tokens per minute, streams at once and budget in micro-USD ('' for each it does not limit),
-- the tokens and micro-USD the call asks, and '1' for a stream.
local record = KEYS[#KEYS]
local epoch_key, held_leases, held = KEYS[#KEYS - 3], KEYS[#KEYS - 2], KEYS[#KEYS - 1]
local subjects = (#KEYS - 4) / 4
local lease, lease_ms = ARGV[1], tonumber(ARGV[2])
local record_prefix = string.sub(record, 1, #record - #lease)

local function arg(subject, position)
  return ARGV[2 + (subject - 1) * 7 + position]
end

local function limit(subject, position)
  local value = arg(subject, position)
  if value == '' then return nil end
  return tonumber(value)
end

-- A count that is no longer kept (a bucket out of the window, a day gone) has nothing left to take back; one that
-- would go below zero (Redis lost what was counted, in a restart, and counted others since) leaves zero.
local function take_back(key, field, amount)
  if redis.call('HEXISTS', key, field) == 1 and redis.call('HINCRBY', key, field, -amount) < 0 then
    redis.call('HSET', key, field, 0)
  end
end

-- A record: the second its reservation was counted in, ':lapsed' after it once its spend was taken back (`lapse`).
local function counted_in(state)
  return tonumber(string.match(state, '^%d+')), string.find(state, ':lapsed', 1, true) ~= nil
end

-- Takes back the spend the reservation holds and ends its lease; what it held ({second, day, then a spend key and
-- an amount per subject}), or nil.
local function give_back_held(id)
  local entry = redis.call('HGET', held, id)
  redis.call('ZREM', held_leases, id)
  redis.call('HDEL', held, id)
  if not entry then return nil end
  local spent = cjson.decode(entry)
  for i = 3, #spent, 2 do take_back(spent[i], spent[2], spent[i + 1]) end
  return spent
end
"""
    + _HELD_ON
)

_RESERVE: Final = (
    _KINDS_CHECKED
    + _RESERVATION
    + """
-- Returns {0, seconds, microseconds} of Redis's clock, and the epoch, when the call is counted in every subject;
-- else, counting it nowhere, {1, subject, limit, ms until it may fit, held} for the first limit it would pass (limit:
-- 1 requests, 2 tokens, 3 streams, 4 budget; held: 1 when the budget would have room but for what calls in progress
-- reserved of it, which one may give back as it settles); or {2} when the reservation has a record already: undone
-- before it ran (its caller no longer waits for this answer), it counts nothing. Sent again once it ran (its
-- connection broke before its answer came), it counts nothing more, and answers as it did: the second (microseconds
-- 0) and the epoch it was counted in.
local state = redis.call('GET', record)
if state then
  if string.match(state, '^%d+$') then return {0, state, '0', redis.call('GET', epoch_key) or ''} end
  return {2}
end
local clock = redis.call('TIME')
local second = tonumber(clock[1])
local now = second + tonumber(clock[2]) / 1000000
local now_ms = second * 1000 + math.floor(tonumber(clock[2]) / 1000)
local day = math.floor(second / 86400)
local epoch = redis.call('GET', epoch_key)

-- The spend held by reservations whose gateway stopped renewing their leases (it died: kill -9, a lost host) is
-- taken back, as no settle will come: their records say so, for a settle or an undo that comes after all (a gateway
-- that lost Redis for longer than a lease).
-- Every one of them, however many: a budget check that left some would refuse calls until midnight with room free.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', held_leases, '-inf', now_ms)) do
  local spent = give_back_held(id)
  if spent then redis.call('SET', record_prefix .. id, spent[1] .. ':lapsed', 'EX', 2 * 86400) end
end

-- The buckets of the last 61 seconds, oldest first, and their sum; older buckets are deleted.
local function window(key)
  local flat = redis.call('HGETALL', key)
  local buckets, sum, stale = {}, 0, {}
  for i = 1, #flat, 2 do
    local at, amount = tonumber(flat[i]), tonumber(flat[i + 1])
    if at < second - 60 then
      stale[#stale + 1] = flat[i]
    else
      buckets[#buckets + 1] = {at, amount}
      sum = sum + amount
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  return buckets, sum
end

-- Ms until enough buckets have left (61 s after their second began) for `wanted` to fit: at the latest when the
-- last has left, as `wanted` is at most `most` (the gateway refuses a call larger than a limit before it asks).
-- Asked only when the buckets fill the room now, so there is one to wait for.
local function free_in(buckets, sum, wanted, most)
  local at
  for _, bucket in ipairs(buckets) do
    at = bucket[1]
    sum = sum - bucket[2]
    if sum + wanted <= most then break end
  end
  return math.max(0, math.ceil((at + 61 - now) * 1000))
end

for s = 1, subjects do
  local keys = (s - 1) * 4
  local requests, tokens, streams, budget = limit(s, 1), limit(s, 2), limit(s, 3), limit(s, 4)
  if requests then
    local buckets, used = window(KEYS[keys + 1])
    if used + 1 > requests then return {1, s, 1, free_in(buckets, used, 1, requests), 0} end
  end
  if tokens then
    local wanted = tonumber(arg(s, 5))
    local buckets, used = window(KEYS[keys + 2])
    if used + wanted > tokens then return {1, s, 2, free_in(buckets, used, wanted, tokens), 0} end
  end
  if streams and arg(s, 7) == '1' then
    redis.call('ZREMRANGEBYSCORE', KEYS[keys + 3], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[keys + 3]) + 1 > streams then return {1, s, 3, 0, 0} end
  end
  if budget then
    local spent, asked = tonumber(redis.call('HGET', KEYS[keys + 4], day) or '0'), tonumber(arg(s, 6))
    if asked > 0 and spent + asked > budget then -- a free call is admitted past the budget too (in_process._check)
      local held_only = spent - (held_on(day)[KEYS[keys + 4]] or 0) + asked <= budget and 1 or 0
      return {1, s, 4, math.ceil(((day + 1) * 86400 - now) * 1000), held_only}
    end
  end
end

for s = 1, subjects do
  local keys = (s - 1) * 4
  if limit(s, 1) then
    redis.call('HINCRBY', KEYS[keys + 1], second, 1)
    redis.call('EXPIRE', KEYS[keys + 1], 120)
  end
  if limit(s, 2) then
    redis.call('HINCRBY', KEYS[keys + 2], second, arg(s, 5))
    redis.call('EXPIRE', KEYS[keys + 2], 120)
  end
  if limit(s, 3) and arg(s, 7) == '1' then
    redis.call('ZADD', KEYS[keys + 3], now_ms + lease_ms, lease)
    redis.call('PEXPIRE', KEYS[keys + 3], 2 * lease_ms)
  end
  if limit(s, 4) then
    redis.call('HINCRBY', KEYS[keys + 4], day, arg(s, 6))
    redis.call('EXPIRE', KEYS[keys + 4], 2 * 86400)
    for _, kept in ipairs(redis.call('HKEYS', KEYS[keys + 4])) do
      if tonumber(kept) < day - 1 then redis.call('HDEL', KEYS[keys + 4], kept) end
    end
  end
end
-- Where it was counted, for an undo should the answer not reach the gateway.
redis.call('SET', record, second, 'EX', 120)
-- The spend it holds until it settles, on a lease its gateway renews.
local spent = {second, day}
for s = 1, subjects do
  if limit(s, 4) and tonumber(arg(s, 6)) > 0 then
    spent[#spent + 1] = KEYS[(s - 1) * 4 + 4]
    spent[#spent + 1] = tonumber(arg(s, 6))
  end
end
if #spent > 2 then
  redis.call('ZADD', held_leases, now_ms + lease_ms, lease)
  redis.call('HSET', held, lease, cjson.encode(spent))
  redis.call('EXPIRE', held_leases, 2 * 86400)
  redis.call('EXPIRE', held, 2 * 86400)
end
-- Kept while reservations come, as long as a spend, so that it too expires when left alone.
epoch = epoch or (clock[1] .. '.' .. clock[2])
redis.call('SET', epoch_key, epoch, 'EX', 2 * 86400)
return {0, clock[1], clock[2], epoch}
"""
)

_UNDO: Final = (
    _KINDS_CHECKED
    + _RESERVATION
    + """
-- Takes back what the reservation counted, if it was counted, and leaves a tombstone so that it never counts (if it
-- has not run yet) nor is taken back twice (an undo sent again). A spend its lease's lapse took back already is not
-- taken back again; one still held is taken back as held.
local state = redis.call('GET', record)
redis.call('SET', record, 'undone', 'EX', 600)
-- The spend it holds, even once its record has expired (an outage of minutes, with no reservation to lapse it).
local held_back = give_back_held(lease)
if not state or state == 'undone' then return 0 end
local counted, lapsed = counted_in(state)
local day = math.floor(counted / 86400)

for s = 1, subjects do
  local keys = (s - 1) * 4
  if limit(s, 1) then take_back(KEYS[keys + 1], counted, 1) end
  if limit(s, 2) then take_back(KEYS[keys + 2], counted, tonumber(arg(s, 5))) end
  if limit(s, 3) and arg(s, 7) == '1' then redis.call('ZREM', KEYS[keys + 3], lease) end
  if limit(s, 4) and not lapsed and not held_back then take_back(KEYS[keys + 4], day, tonumber(arg(s, 6))) end
end
return 1
"""
)

_SETTLE: Final = (
    _KINDS_CHECKED
    + """
-- KEYS: those to correct, then the epoch, the held spends' leases and the held spends, then the reservation's
-- record. ARGV[1]: the second the call was counted in, ARGV[2]: its UTC day, ARGV[3]: its lease, ARGV[4]: the epoch
-- it was counted in; then 3 per key to correct: what to do ('tokens' or 'spend', the correction to what was
-- reserved, and what was reserved; or 'lease', '' and '').
-- It runs once per reservation: a settle sent again (its first answer lost, though it ran) finds the record marked.
-- A correction whose bucket or day is no longer kept has nothing left to correct; one that would take a count below
-- zero leaves zero. A reservation from another epoch (Redis lost it, in a restart or a flush) is not counted: what
-- its correction would take back belongs to the calls counted since, so it corrects nothing. One whose spend lapsed
-- (its gateway lost Redis for longer than a lease) adds what was billed, its reservation taken back already. What
-- was billed counts on Redis's day when it settles, as the ledger records it: a call reserved before midnight and
-- settled after has its reservation taken back from the day before, and its bill counted on the new one.
local record = KEYS[#KEYS]
local state = redis.call('GET', record)
if state == 'settled' then return 0 end
redis.call('SET', record, 'settled', 'EX', 120)
redis.call('ZREM', KEYS[#KEYS - 2], ARGV[3])
redis.call('HDEL', KEYS[#KEYS - 1], ARGV[3])
local second = tonumber(redis.call('TIME')[1])
local counted, day, lease = ARGV[1], ARGV[2], ARGV[3]
local lost = redis.call('GET', KEYS[#KEYS - 3]) ~= ARGV[4]
local lapsed = state ~= false and string.find(state, ':lapsed', 1, true) ~= nil

local function correct(key, field, amount)
  if redis.call('HEXISTS', key, field) == 1 and redis.call('HINCRBY', key, field, amount) < 0 then
    redis.call('HSET', key, field, 0)
  end
end

for i = 1, #KEYS - 4 do
  local key, action, amount, reserved = KEYS[i], ARGV[2 + 3 * i], ARGV[3 + 3 * i], ARGV[4 + 3 * i]
  if action == 'tokens' then
    if not lost and tonumber(counted) >= second - 60 then correct(key, counted, amount) end
  elseif action == 'spend' then
    local today = tostring(math.floor(second / 86400))
    if lost then
      -- its counts are another epoch's: nothing of this call is in them
    elseif today == day then
      correct(key, day, lapsed and amount + reserved or amount)
    else
      if not lapsed then correct(key, day, -reserved) end
      redis.call('HINCRBY', key, today, amount + reserved)
      redis.call('EXPIRE', key, 2 * 86400)
    end
  else
    redis.call('ZREM', key, lease)
  end
end
return 0
"""
)

_AT_LEAST: Final = (
    _KINDS_CHECKED
    + """
-- KEYS: spend hashes, then the held spends; ARGV: the micro-USD of calls billed each is to count on the day that
-- follows them (UTC, in days since the epoch) at least, nothing when that is not Redis's day (a gateway's clock a
-- moment behind Redis's at midnight: yesterday's spend, not today's). Set against what it counts of calls billed,
-- beside what calls in progress hold (which their settles will correct), as in process: raised, never lowered, so
-- the same spend given by several gateways (or sent twice) counts once.
local held = KEYS[#KEYS]
"""
    + _HELD_ON
    + """
local day = math.floor(tonumber(redis.call('TIME')[1]) / 86400)
if tonumber(ARGV[#KEYS]) ~= day then
  return 0
end
local holding = held_on(day)
for i = 1, #KEYS - 1 do
  local key, billed = KEYS[i], tonumber(ARGV[i])
  local held_here = holding[key] or 0
  if tonumber(redis.call('HGET', key, day) or '0') - held_here < billed then
    redis.call('HSET', key, day, billed + held_here)
    redis.call('EXPIRE', key, 2 * 86400)
  end
end
return 0
"""
)

_PROBE: Final = """
-- KEYS[1]: the probe's key. A write, as every script here makes: a Redis that answers but refuses writes (out of
-- memory under noeviction, a read-only replica) is not back. A script, so that it needs no permission they do not.
redis.call('SET', KEYS[1], 1, 'PX', 1000)
return 0
"""

_RENEW: Final = (
    _KINDS_CHECKED
    + """
-- KEYS[1]: the held spends' leases; then 2 per stream lease: a streams set and the reservation's record.
-- ARGV[1]: a lease's length in ms, ARGV[2]: how many held spends' leases follow; then they, then the stream leases.
-- A stream lease that is not in its set any more (it lapsed while Redis was out of reach for longer than a lease,
-- or Redis lost it in a restart or a flush) belongs to a stream that is still open: it is added again, unless its
-- settle has run since (the record says so), so that a renewal racing a settle never brings a slot back. A held
-- spend's lease is only extended: one that lapsed had its spend taken back, and its settle adds what was billed.
local clock = redis.call('TIME')
local expiry = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + tonumber(ARGV[1])
local held = tonumber(ARGV[2])
for i = 1, held do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[2 + i]) end
for i = 1, (#KEYS - 1) / 2 do
  local key, record, lease = KEYS[2 * i], KEYS[2 * i + 1], ARGV[2 + held + i]
  if redis.call('GET', record) ~= 'settled' then
    redis.call('ZADD', key, expiry, lease)
    redis.call('PEXPIRE', key, 2 * tonumber(ARGV[1]))
  end
end
return 0
"""
)

_REMAKE: Final = (
    _KIND_OF
    + """
-- KEYS: the keys of a script call that Redis refused with WRONGTYPE. Deletes each of another kind than kept there, at
-- once, so that no gateway's key of the right kind, made meanwhile, is taken; answers the keys deleted.
local deleted = {}
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'none' and kind ~= kind_of(key) then
    redis.call('DEL', key)
    deleted[#deleted + 1] = key
  end
end
return deleted
"""
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@immutable
class _Hold:
    """Where a reservation was counted, for settle()."""

    second: int
    day: int
    lease: str
    lease_keys: tuple[str, ...]
    """The streams sets holding the lease; empty for a call that takes no stream slot."""
    epoch: str
    """Redis's epoch when it counted the reservation: a settle in another one corrects nothing."""
    holds_spend: bool
    """Whether it holds spend on a lease (HELD_LEASES_KEY), which its settle ends."""


class RedisLimiter:
    """Limits kept in Redis: exact over every gateway sharing it, as each call's check-and-reserve is one script."""

    def __init__(
        self,
        url: str,
        *,
        refuse_when_unavailable: bool = False,
        timeout_s: float = 0.5,
        stream_lease_s: float = STREAM_LEASE_S,
        probe_interval_s: float = PROBE_INTERVAL_S,
        max_kept: int = MAX_KEPT,
    ) -> None:
        self._where = _redacted(url)
        self._secrets = _secrets(url)
        self._refuse = refuse_when_unavailable
        self._timeout_s = timeout_s
        self._lease_ms = round(stream_lease_s * 1000)
        self._probe_interval_s = probe_interval_s
        self._max_kept = max_kept
        pool = BlockingConnectionPool.from_url(
            url,
            # RESP2 (unless the URL names a protocol): under RESP3, redis-py 8 (maint_notifications "auto") skips the
            # pool's check that a connection left idle is still open, so a Redis or a proxy that closes idle
            # connections (Redis's `timeout`) would fail the next command on each. `_within_timeout` sends a command
            # once more on a connection found broken all the same, as one may break however the pool checks it.
            protocol=2,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._client: Redis = Redis.from_pool(pool)
        self._reserve_script = self._client.register_script(_RESERVE)
        self._settle_script = self._client.register_script(_SETTLE)
        self._renew_script = self._client.register_script(_RENEW)
        self._undo_script = self._client.register_script(_UNDO)
        self._probe_script = self._client.register_script(_PROBE)
        self._at_least_script = self._client.register_script(_AT_LEAST)
        self._remake_script = self._client.register_script(_REMAKE)
        # Reservations (and so leases) are named by limiter (one per gateway process) and call, so no two gateways
        # ever name one alike.
        owner = uuid.uuid4().hex
        self._reservation_ids = (f"{owner}:{n}" for n in itertools.count())
        self._leases: dict[str, tuple[str, ...]] = {}
        """The open streams' leases, to renew: the streams sets holding each."""
        self._held: set[str] = set()
        """The leases of the reservations in progress that hold spend, to renew."""
        self._kept: dict[str, tuple[AsyncScript, list[str], list[str | int]]] = {}
        """What Redis is still to be sent, by reservation id, in order: the undo of a reservation given up on before
        its answer came, or the settle of one, whose script, keys and arguments are sent as they are."""
        self._sending: asyncio.Task[None] | None = None
        self._settles_sent = 0
        """Settles sent and not answered yet: a stop waits for them (`aclose`), whose calls it no longer waits for."""
        self._settles_answered: asyncio.Event | None = None
        """Made by a stop that waits for them, set once none is left."""
        self._dropped = 0
        """Undos and settles not kept, as many being kept already, since the kept ones were last all sent."""
        self._spent_kept: dict[str, int] = {}
        """The day's spend by the ledger that Redis could not be given (`spend_at_least`), by subject: given when it
        is back, that same UTC day (`_spent_day`)."""
        self._spent_day = 0
        self._available = True
        self._unreachable_because = ""
        self._calls_while_unavailable = 0
        self._renewing: asyncio.Task[None] | None = None
        self._probing: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        """Whether calls are counted in Redis now (false from a failure until a probe reaches it again)."""
        return self._available

    @property
    def calls_while_unavailable(self) -> int:
        return self._calls_while_unavailable

    async def start(self) -> None:
        self._renewing = asyncio.create_task(self._renew_leases(), name="llmrelay-limits-lease-renewal")
        try:
            await self._within_timeout(self._client.ping)
        except _UNREACHABLE as error:
            self._went_unreachable(error)
        else:
            log.info("limits: shared through Redis at %s", self._where)

    async def reserve(self, asks: Sequence[Ask]) -> Reservation:
        # Before Redis is asked: a call larger than a limit is refused alike whether Redis is reachable or not.
        refuse_oversized(asks)
        if not self._available:
            return self._uncounted(asks)
        stream_keys = tuple(
            _keys(ask.subject)[2] for ask in asks if ask.stream and ask.limits.concurrent_streams is not None
        )
        reservation_id = next(self._reservation_ids)  # also its stream lease's name
        keys: list[str] = []
        args: list[str | int] = [reservation_id, self._lease_ms]
        for ask in asks:
            keys += _keys(ask.subject)
            limits = ask.limits
            args += [
                _unlimited_if_none(limits.requests_per_minute),
                _unlimited_if_none(limits.tokens_per_minute),
                _unlimited_if_none(limits.concurrent_streams),
                _unlimited_if_none(budget_usd_micros(limits)),
                ask.tokens,
                ask.usd_micros,
                int(ask.stream),
            ]
        keys += [EPOCH_KEY, HELD_LEASES_KEY, HELD_KEY, f"{RECORD_PREFIX}{reservation_id}"]
        try:
            answer = await self._run(self._reserve_script, keys, args)
        except _UNREACHABLE as error:
            # The script may have reached Redis, and run (or run later): what it counted is taken back.
            self._went_unreachable(error)
            self._send_later(reservation_id, self._undo_script, keys, args)
            return self._uncounted(asks)
        except asyncio.CancelledError:
            # The caller left: no one will settle what the script counted.
            self._send_later(reservation_id, self._undo_script, keys, args)
            raise
        if answer[0] == 1:
            _, subject, code, retry_ms, held_only = answer
            kind = _KINDS[code - 1]
            if kind is LimitKind.CONCURRENT_STREAMS:
                retry_after_s = STREAM_RETRY_S
            elif held_only:  # it may fit as soon as a call in progress settles below what it reserved, as in process
                retry_after_s = min(STREAM_RETRY_S, retry_ms / 1000)
            else:
                retry_after_s = retry_ms / 1000
            raise refusal(kind, asks[subject - 1], retry_after_s)
        second, micros, epoch = int(answer[1]), int(answer[2]), _text(answer[3])
        if stream_keys:
            self._leases[reservation_id] = stream_keys
        # As the script holds it: spend asked of a budget.
        holds_spend = any(ask.usd_micros > 0 and ask.limits.budget_usd_per_day is not None for ask in asks)
        if holds_spend:
            self._held.add(reservation_id)
        hold = _Hold(second, second // 86_400, reservation_id, stream_keys, epoch, holds_spend)
        return Reservation(asks, second + micros / 1e6, [hold])

    async def settle(self, reservation: Reservation, tokens: int, usd_micros: int) -> None:
        if not reservation.holds:
            return  # admitted uncounted while Redis was unreachable: nothing to correct
        hold: _Hold = reservation.holds[0]
        self._leases.pop(hold.lease, None)
        # Its held spend's lease is renewed until its settle has run (in `_settled`): one that lapsed meanwhile would
        # have its spend given back by the next reservation, and a settle dropped or never sent would not add it.
        keys: list[str] = []
        args: list[str | int] = [hold.second, hold.day, hold.lease, hold.epoch]
        for ask in reservation.asks:
            _, tokens_key, _, spend_key = _keys(ask.subject)
            if ask.limits.tokens_per_minute is not None and tokens != ask.tokens:
                keys.append(tokens_key)
                args += ["tokens", tokens - ask.tokens, ask.tokens]
            # Sent even as reserved when held: a spend whose lease lapsed was taken back, and is added again.
            if ask.limits.budget_usd_per_day is not None and (usd_micros != ask.usd_micros or hold.holds_spend):
                keys.append(spend_key)
                args += ["spend", usd_micros - ask.usd_micros, ask.usd_micros]
        for key in hold.lease_keys:
            keys.append(key)
            args += ["lease", "", ""]
        if not keys:
            self._held.discard(hold.lease)
            return  # billed what it reserved, and nothing held to free
        keys += [EPOCH_KEY, HELD_LEASES_KEY, HELD_KEY, f"{RECORD_PREFIX}{hold.lease}"]
        if not self._available:
            # Sent when Redis is back, before calls are counted again; the caller's answer does not wait for it.
            self._send_later(hold.lease, self._settle_script, keys, args)
            return
        self._settles_sent += 1
        try:
            await self._run(self._settle_script, keys, args)
        except _UNREACHABLE as error:
            # It may have run, its answer lost: sent again, the record's mark makes it change nothing.
            self._went_unreachable(error)
            self._send_later(hold.lease, self._settle_script, keys, args)
        except asyncio.CancelledError:
            self._send_later(hold.lease, self._settle_script, keys, args)
            raise
        else:
            self._held.discard(hold.lease)
        finally:
            self._settles_sent -= 1
            if not self._settles_sent and self._settles_answered is not None:
                self._settles_answered.set()

    async def spend_at_least(self, spent: Mapping[str, int], day: int) -> None:
        if not spent:
            return
        if self._available:
            try:
                await self._run_at_least(spent, day)
                return
            except _UNREACHABLE as error:
                self._went_unreachable(error)
        # Kept for when Redis is back: out of reach for a moment as the gateway starts or reloads its keys (started
        # with Redis, or a network blip), the day's budgets counted from nothing once it was back, the spend gone.
        if day != self._spent_day:
            self._spent_kept, self._spent_day = {}, day
        for subject, micros in spent.items():
            self._spent_kept[subject] = max(micros, self._spent_kept.get(subject, 0))
        log.warning(
            "limits: Redis at %s cannot be reached: today's spend of %d daily budgets, from the ledger, is counted"
            " once it is back",
            self._where,
            len(spent),
        )

    async def _run_at_least(self, spent: Mapping[str, int], day: int) -> None:
        keys = [*(_keys(subject)[3] for subject in spent), HELD_KEY]
        await self._run(self._at_least_script, keys, [*spent.values(), day])

    async def _send_spent_kept(self) -> None:
        """The day's spend kept while Redis was out of reach (`spend_at_least`), given now: for nothing on another
        day (the script's check), whose budgets it is not of."""
        if self._spent_kept:
            await self._run_at_least(self._spent_kept, self._spent_day)
        self._spent_kept = {}

    def health(self) -> StoreHealth:
        if self._available:
            return StoreHealth(StoreRole.LIMITS, "redis", available=True)
        description = f"{self._where} cannot be reached ({self._unreachable_because}); calls are {self._policy}"
        return StoreHealth(StoreRole.LIMITS, "redis", available=False, description=description)

    async def aclose(self) -> None:
        """Waits for the settles sent (each within its bound), stops renewing and probing, makes a last
        try at the undos and settles not sent yet, and closes the connections. The leases of streams still open lapse
        by themselves; a gateway closes its limiter only after its calls have ended, their settles perhaps not."""
        if self._settles_sent:
            self._settles_answered = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                # A settle's own bound (`_run`: a key remade and the script sent again included).
                async with asyncio.timeout(3 * self._timeout_s):
                    await self._settles_answered.wait()
        for task in (self._renewing, self._probing, self._sending):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._kept:
            try:
                await self._send_kept()
            except _UNREACHABLE as error:
                # Nothing renews their held spends' leases from now on.
                log.warning(
                    "limits: Redis at %s cannot be reached (%s): %d calls that ended or gave up waiting are not"
                    " settled: their requests and tokens stay counted for their minute, and the spend they reserved is"
                    " given back within %g s, as their leases lapse, with what they were billed never counted",
                    self._where,
                    self._reason(error),
                    len(self._kept) + self._dropped,
                    self._lease_ms / 1000,
                )
        await self._client.aclose()

    @property
    def _policy(self) -> str:
        """What happens to calls while Redis is unreachable (state.on_unavailable)."""
        return f"{'refused' if self._refuse else 'admitted without being counted'} until it is back"

    @property
    def _held_spend_fate(self) -> str:
        """How long the spend of a call whose settle was dropped stays counted: its lease is renewed, not ended."""
        return (
            "until the end of the UTC day while this gateway renews its lease; given back once the lease lapses,"
            f" {self._lease_ms / 1000:g} s after this gateway stops or Redis is out of reach that long"
        )

    def _uncounted(self, asks: Sequence[Ask]) -> Reservation:
        self._calls_while_unavailable += 1
        if self._refuse:
            raise LimitsUnavailableError(self._probe_interval_s)
        return Reservation(asks, time.time())

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        """The script's answer. A key of another kind than the script keeps there is deleted, and the script sent once
        more: one subject's broken key would otherwise fail every call of every caller as Redis unreachable."""
        try:
            return await self._within_timeout(lambda: script(keys, args))
        except ResponseError as error:
            if "WRONGTYPE" not in str(error):  # `_KINDS_CHECKED`'s refusal, before the script wrote anything
                raise
            # Sent again whether this call deleted one or a call beside it did (several meet it at once).
            deleted = await self._within_timeout(lambda: self._remake_script(keys, []))
            if deleted:
                log.warning(
                    "limits: Redis at %s held %s, of another kind than the limits keep there: deleted, what it counted"
                    " starts anew (the keys under %s are the gateway's own; give other data other names)",
                    self._where,
                    ", ".join(_text(key) for key in deleted),
                    KEY_PREFIX,
                )
        return await self._within_timeout(lambda: script(keys, args))

    async def _within_timeout(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """The command's answer, or TimeoutError after state.timeout_s, connecting and queuing for a connection
        included. On a connection found broken (a Redis or a proxy closed it while it was idle, or it was reset), it
        is sent once more, within the same time, on a new connection: one broken connection is not Redis gone. Every
        command here changes nothing the second time it runs (see `_BROKEN_CONNECTION`)."""
        async with asyncio.timeout(self._timeout_s):
            try:
                return await command()
            except (AuthenticationError, AuthorizationError):
                raise
            except _BROKEN_CONNECTION as error:
                log.debug(
                    "limits: a connection to Redis at %s broke (%s): sent again", self._where, self._reason(error)
                )
            # The connections left idle beside it may have been closed alike: new ones are opened instead.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            return await command()

    def _send_later(self, reservation_id: str, script: AsyncScript, keys: list[str], args: list[str | int]) -> None:
        """Has the reservation's undo or settle run: now, in the background, while Redis is reachable; else by the
        probe that finds it back, before calls are counted again. Past `max_kept` kept, it is dropped."""
        if len(self._kept) >= self._max_kept:
            if not self._dropped:
                log.warning(
                    "limits: %d settles and undos wait for Redis at %s, as many as are kept: the calls that end"
                    " from now on until it is back stay counted as they were reserved (requests and tokens for their"
                    " minute; spend %s)",
                    len(self._kept),
                    self._where,
                    self._held_spend_fate,
                )
            self._dropped += 1
            return
        self._kept[reservation_id] = (script, keys, args)
        if self._available and (self._sending is None or self._sending.done()):
            self._sending = asyncio.create_task(self._send_in_background(), name="llmrelay-limits-kept")

    async def _send_in_background(self) -> None:
        try:
            await self._send_kept()
        except _UNREACHABLE as error:
            self._went_unreachable(error)  # the probe sends them when Redis is back

    async def _send_kept(self) -> None:
        """Sends the kept undos and settles, oldest first, one script call each, until none is left; raises at the
        first that fails, leaving it and the rest kept. One sent twice (by the probe and the background task at once,
        or after an answer lost) changes nothing the second time."""
        while self._kept:
            reservation_id, (script, keys, args) = next(iter(self._kept.items()))
            await self._run(script, keys, args)
            self._kept.pop(reservation_id, None)
            self._held.discard(reservation_id)  # a settle's, which ended its lease (an undo's holds none here)
        if self._dropped:
            log.warning(
                "limits: Redis at %s has every settle and undo kept for it; %d more could not be kept, and their calls"
                " stay counted as they were reserved (requests and tokens for their minute; spend %s)",
                self._where,
                self._dropped,
                self._held_spend_fate,
            )
            self._dropped = 0

    def _went_unreachable(self, error: BaseException) -> None:
        if not self._available:
            return
        self._available = False
        self._unreachable_because = self._reason(error)
        log.warning(
            "limits: Redis at %s cannot be reached (%s): calls are %s",
            self._where,
            self._unreachable_because,
            self._policy,
        )
        self._probing = asyncio.create_task(self._probe(), name="llmrelay-limits-redis-probe")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                await self._run(self._probe_script, [PROBE_KEY], [])
            except _UNREACHABLE as error:
                self._unreachable_because = self._reason(error)
                continue
            # Connections left idle in the pool since before the outage may lead to a Redis that is gone (its
            # restart closed them): new ones reach the one that answered.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            # What Redis counted for calls that gave up on it is taken back, and the calls that ended meanwhile are
            # settled, before new calls are counted against it.
            try:
                await self._send_kept()
                await self._send_spent_kept()
            except _UNREACHABLE as error:
                self._unreachable_because = self._reason(error)
                continue
            self._available = True
            log.info("limits: Redis at %s is reachable again: limits are enforced", self._where)
            return

    async def _renew_leases(self) -> None:
        """Every third of a lease, extends the leases of this gateway's open streams and held spends, all in one
        script call; with none, probes Redis instead, so that an idle gateway's health says when Redis is gone (and
        new calls do not each find it out by waiting state.timeout_s)."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            if not self._available:
                continue
            if not (self._leases or self._held):
                try:
                    await self._run(self._probe_script, [PROBE_KEY], [])
                except _UNREACHABLE as error:
                    self._went_unreachable(error)
                continue
            keys: list[str] = [HELD_LEASES_KEY]
            args: list[str | int] = [self._lease_ms, len(self._held), *self._held]
            for lease, lease_keys in self._leases.items():
                for key in lease_keys:
                    keys += [key, f"{RECORD_PREFIX}{lease}"]
                    args.append(lease)
            try:
                await self._run(self._renew_script, keys, args)
            except _UNREACHABLE as error:
                self._went_unreachable(error)

    def _reason(self, error: BaseException) -> str:
        """What went wrong, in words, without the password (a driver's message might quote what it was given)."""
        text = str(error) or type(error).__name__
        if isinstance(error, (TypeError, AttributeError)):
            text = f"{type(error).__name__}: {text}"  # the driver's internals: the words alone would say little
        elif isinstance(error, TimeoutError):
            text = f"no answer within {self._timeout_s:g} s"
        elif isinstance(error, OutOfMemoryError):
            text = (
                "out of memory: it refuses writes past its maxmemory under maxmemory-policy noeviction; give it more"
                f" memory, or the limits a Redis of their own ({text})"
            )
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _keys(subject: str) -> tuple[str, str, str, str]:
    """The subject's requests, tokens, streams and spend keys."""
    prefix = f"{KEY_PREFIX}{subject}:"
    return f"{prefix}requests", f"{prefix}tokens", f"{prefix}streams", f"{prefix}spend"


def _text(value: bytes | str) -> str:
    """A script's string answer, as text (the client returns bytes unless it decodes responses)."""
    return value.decode() if isinstance(value, bytes) else value


def _unlimited_if_none(limit: int | None) -> str | int:
    return "" if limit is None else limit


def _redacted(url: str) -> str:
    """The URL with its passwords (in the authority, or a parameter such as unix://'s `password=`) replaced by ***; a
    user without a password too, as that is how a password written without its colon (redis://PASSWORD@HOST) reads."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    elif parts.username:
        netloc = f"***@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{name}=***" if _a_password(name := pair.partition("=")[0]) else pair
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _a_password(parameter: str) -> bool:
    """Whether a URL's parameter holds a password: `password`, and `ssl_password` (the client key's, which redis-py
    passes on to its TLS connection)."""
    return "password" in parameter.lower()


def _secrets(url: str) -> tuple[str, ...]:
    """The URL's passwords, as written and decoded, to scrub from any text that might quote them."""
    parts = urlsplit(url)
    written = [parts.password if parts.password is not None else parts.username or ""]  # see _redacted
    written += [
        value for name, _, value in (pair.partition("=") for pair in parts.query.split("&")) if _a_password(name)
    ]
    return tuple({form for secret in written if secret for form in (secret, unquote(secret))})
