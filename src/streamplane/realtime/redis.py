"""The Redis engines: any number of gateway processes and machines serving one event.

One engine, two topologies: a single Redis (``RedisBroker.connect("redis://…")``) or a Redis
Cluster (``cluster=True``). Every key of a channel carries the channel in a hash tag,
``<prefix>{<channel>}:<part>``, so all of a channel lives on one cluster slot and each Lua script
touches one slot; channels spread over the shards by their names.

Per channel (``docs/realtime.md`` has the table):

- ``:m`` a hash ``epoch, top, oldest``: the stream's epoch, its last offset and the oldest offset
  still recoverable (the size and age limits applied logically, exactly).
- ``:h`` a stream, one entry per publication with the id ``<offset>-0`` (so a recovery is one
  ``XRANGE``), trimmed with ``XTRIM MINID ~`` (whole macro nodes, cheap) behind ``oldest``.
- ``:p`` the pub/sub channel (``SPUBLISH`` in a cluster: sharded pub/sub stays on the shard
  instead of crossing the whole cluster bus).
- ``:s`` / ``:q`` the state channel's values and their source sequence numbers.
- ``:z`` / ``:i`` presence: a sorted set of connections by expiry time (the engine's clock) and
  their entries.
- ``:a`` presence shares of a large channel: ``node -> clients:users:until``, one per gateway
  process, counted instead of listed.
- ``:u`` / ``:au`` the users the shares hold: ``user -> how many shares hold it`` (its length is
  the distinct users), and ``<node> NUL <user>`` in a sorted set (one node's users are one lex
  range, dropped when its share is withdrawn or found dead).
- ``:c`` viewer counts: ``node -> count:until`` per channel.
- ``:r:<user>`` a user's chat rate-limit bucket on the channel (tokens and when), expiring once
  it would be full again.

A publication is one script: the epoch is created when the meta hash is missing (a Redis that
lost its data, an expired channel), the offset is ``top + 1``, the entry is added, trimmed, and
published on the channel in the same atomic step, so pub/sub order is offset order and no two
publications share an offset. A state write checks the source sequence in the same script.

Fan-out uses one plain connection per Redis server (per shard primary) that this module reads
itself: redis-py's pub/sub reconnects and resubscribes silently, which would hide exactly the
gap a subscriber must hear of. When such a connection drops, the node reports itself degraded,
reconnects with backoff (following a channel to its new shard in a cluster), resubscribes, and
only once every channel of that connection is confirmed calls the :meth:`on_recovered` listeners
with those channels, so their subscribers recover from their last positions or reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
import msgspec
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from streamplane.lifetime import cancellable
from streamplane.realtime.broker import (
    BrokerError,
    BrokerUnavailable,
    Clock,
    CountReport,
    Deliver,
    Health,
    HistoryPage,
    Position,
    PresenceEntry,
    PresenceShare,
    PresenceStats,
    Publication,
    RateTaken,
    Recovered,
    RecoveryListener,
    StateValue,
    StateWrite,
    state_data,
    state_from_data,
)
from streamplane.realtime.history import missed_range

__all__ = ["DEFAULT_PREFIX", "RedisBroker", "channel_key", "client_options"]

_log = logging.getLogger(__name__)

DEFAULT_PREFIX = "sp:rt:"
# How long a channel's epoch and state outlive its last publication: a client that comes back
# within it to a quiet channel recovers ("nothing missed") instead of reloading.
DEFAULT_META_TTL = 24 * 3600.0
_SEQ_BOUND = 2**63
_MAX_SAFE = 2**53 - 1

RedisClient = aioredis.Redis | RedisCluster
Arg = bytes | str | int

# ARGV for both: 1 epoch if new, 2 body, 3 now ms, 4 history size, 5 history ttl ms,
# 6 meta ttl ms, 7 PUBLISH or SPUBLISH, 8 pub/sub channel.
# KEYS: 1 meta, 2 stream (+ 3 state values, 4 state sequences for a state write).
_APPEND = """
local function append(meta, stream)
  local epoch = redis.call('HGET', meta, 'epoch')
  local top, oldest
  if not epoch then
    epoch = ARGV[1]; top = 0; oldest = 1
    redis.call('DEL', stream)
  else
    top = tonumber(redis.call('HGET', meta, 'top'))
    oldest = tonumber(redis.call('HGET', meta, 'oldest'))
    if redis.call('EXISTS', stream) == 0 then oldest = top + 1 end
  end
  top = top + 1
  local now = tonumber(ARGV[3])
  redis.call('XADD', stream, top .. '-0', 't', ARGV[3], 'b', ARGV[2])
  local size = tonumber(ARGV[4])
  if oldest < top - size + 1 then oldest = top - size + 1 end
  local cutoff = now - tonumber(ARGV[5])
  local count = 1  -- usually the oldest entry is still fresh: look at it alone
  while oldest <= top do
    local batch = redis.call('XRANGE', stream, oldest .. '-0', '+', 'COUNT', count)
    local fresh = false
    for i = 1, #batch do
      if tonumber(batch[i][2][2]) < cutoff then
        oldest = tonumber(string.match(batch[i][1], '^(%d+)')) + 1
      else
        fresh = true
        break
      end
    end
    if fresh or #batch < count then break end
    count = 64
  end
  redis.call('XTRIM', stream, 'MINID', '~', oldest .. '-0')
  redis.call('HSET', meta, 'epoch', epoch, 'top', top, 'oldest', oldest)
  redis.call('PEXPIRE', meta, ARGV[6])
  redis.call('PEXPIRE', stream, math.max(tonumber(ARGV[5]), 1000))
  redis.call(ARGV[7], ARGV[8], epoch .. ' ' .. top .. ' ' .. ARGV[2])
  return {epoch, top}
end
"""

_PUBLISH = (
    _APPEND
    + """
local at = append(KEYS[1], KEYS[2])
return {1, at[1], at[2]}
"""
)

# ARGV 9 key, 10 seq (20 digits, offset by 2^63), 11 the encoded value.
_STATE_WRITE = (
    _APPEND
    + """
local held = redis.call('HGET', KEYS[4], ARGV[9])
if held then
  -- two halves of 10 digits: each exact in Lua's doubles, where the whole is not
  local hi, lo = tonumber(string.sub(held, 1, 10)), tonumber(string.sub(held, 11))
  local nhi, nlo = tonumber(string.sub(ARGV[10], 1, 10)), tonumber(string.sub(ARGV[10], 11))
  if nhi < hi or (nhi == hi and nlo <= lo) then
    return {0, redis.call('HGET', KEYS[3], ARGV[9])}
  end
end
redis.call('HSET', KEYS[4], ARGV[9], ARGV[10])
redis.call('HSET', KEYS[3], ARGV[9], ARGV[11])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
local at = append(KEYS[1], KEYS[2])
return {1, at[1], at[2]}
"""
)

# KEYS meta, stream; ARGV 1 epoch if new, 2 meta ttl ms, 3 mode ('range' or 'newest'),
# 4 the client's epoch (range) or '' , 5 first offset wanted (range), 6 count.
# An untouched channel gets its epoch now, so the first subscriber's position stays valid
# when the first publication comes.
_READ = """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0, 'oldest', 1)
  redis.call('DEL', stream)
end
redis.call('PEXPIRE', meta, ARGV[2])
local top = tonumber(redis.call('HGET', meta, 'top'))
local oldest = tonumber(redis.call('HGET', meta, 'oldest'))
local count = tonumber(ARGV[6])
local entries = {}
if count > 0 and oldest <= top then
  if ARGV[3] == 'range' then
    local first = tonumber(ARGV[5])
    if ARGV[4] == epoch and first >= oldest and first <= top then
      entries = redis.call('XRANGE', stream, first .. '-0', top .. '-0', 'COUNT', count)
    end
  else
    entries = redis.call('XREVRANGE', stream, top .. '-0', oldest .. '-0', 'COUNT', count)
  end
end
return {epoch, top, oldest, entries}
"""

# KEYS expiry zset, entries hash; ARGV 1 now ms. Drops the entries whose expiry has passed.
_PRUNE = """
local function prune(zset, hash, now)
  local dead = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  if #dead > 0 then
    redis.call('HDEL', hash, unpack(dead))
    redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
  end
end
local function keep(key, ms)
  if redis.call('PTTL', key) < tonumber(ms) then redis.call('PEXPIRE', key, ms) end
end
-- A node's report in a hash of reports (node -> value), or its withdrawal ('').
local function report(hash, node, value, ms)
  if value == '' then
    redis.call('HDEL', hash, node)
  else
    redis.call('HSET', hash, node, value)
    keep(hash, ms)
  end
end
"""

# ARGV 1 now, 2 until, 3 key ttl ms, 4 client, 5 entry
_PRESENCE_JOIN = (
    _PRUNE
    + """
prune(KEYS[1], KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
keep(KEYS[1], ARGV[3]); keep(KEYS[2], ARGV[3])
return 1
"""
)

# ARGV 1 now, 2 until, 3 key ttl ms, 4.. clients. Only a live entry is extended: an expired
# connection stays gone even before a read has pruned it.
_PRESENCE_REFRESH = (
    _PRUNE
    + """
local now = tonumber(ARGV[1])
for i = 4, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[i]) end
end
keep(KEYS[1], ARGV[3]); keep(KEYS[2], ARGV[3])
return 1
"""
)

# Which users the shares hold. ``:au`` is a sorted set of ``<node> NUL <user>``, every score 0,
# so one node's users are one lex range (a dead node's are found without a key per node, which
# a script in a cluster could not declare); ``:u`` maps a user to how many shares hold it, so
# its length is the distinct users of every share, read in one step however large.
_HELD = """
local function hold(users, held, node, user)
  if redis.call('ZADD', held, 0, node .. '\\0' .. user) == 1 then
    redis.call('HINCRBY', users, user, 1)
  end
end
local function unhold(users, held, node, user)
  if redis.call('ZREM', held, node .. '\\0' .. user) == 1 then
    if redis.call('HINCRBY', users, user, -1) <= 0 then redis.call('HDEL', users, user) end
  end
end
local function held_by(held, node)
  local out, from = {}, #node + 2
  local range = redis.call('ZRANGEBYLEX', held, '[' .. node .. '\\0', '(' .. node .. '\\1')
  for i = 1, #range do out[i] = string.sub(range[i], from) end
  return out
end
"""

# KEYS expiry zset, entries hash, shares hash, share users hash, held users zset; ARGV 1 now ms.
# The live shares' clients summed and the distinct users they hold (a dead share goes, and the
# users only it held), then the live entries: {clients, users, client, entry, client, entry...}.
_PRESENCE_STATS = (
    _PRUNE
    + _HELD
    + """
prune(KEYS[1], KEYS[2], ARGV[1])
local now, clients, dead = tonumber(ARGV[1]), 0, {}
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local c, u, untl = string.match(all[i + 1], '^(%d+):(%d+):(%d+)$')
  if c and tonumber(untl) > now then clients = clients + tonumber(c)
  else dead[#dead + 1] = all[i] end
end
if #dead > 0 then
  redis.call('HDEL', KEYS[3], unpack(dead))
  for _, node in ipairs(dead) do
    for _, user in ipairs(held_by(KEYS[5], node)) do unhold(KEYS[4], KEYS[5], node, user) end
  end
end
-- No live share, no user held (a small channel reads nothing more).
local users = 0
if #all / 2 > #dead then users = redis.call('HLEN', KEYS[4]) end
local out = {clients, users}
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if #members == 0 then return out end
local entries = redis.call('HMGET', KEYS[2], unpack(members))
for i = 1, #members do
  if entries[i] then out[#out + 1] = members[i]; out[#out + 1] = entries[i] end
end
return out
"""
)

# KEYS expiry zset, entries hash, shares hash, share users hash, held users zset; ARGV 1 node,
# 2 'clients:users:until' or '' to withdraw, 3 key ttl ms, 4 'full' (ARGV's users are all this
# node holds) or 'delta' (added, then removed), 5 how many entries to drop, 6 how many users
# added; then this node's entries to drop in the same step, the users added, the users removed.
# Answers 1 when the node must send its users in full next time: its share was gone (expired
# while the process was starved, or Redis lost it), and with it the users it held.
_PRESENCE_SHARE = (
    _PRUNE
    + _HELD
    + """
local node, value, ms = ARGV[1], ARGV[2], ARGV[3]
local again = 0
if value == '' then
  redis.call('HDEL', KEYS[3], node)
elseif redis.call('HSET', KEYS[3], node, value) == 1 then
  -- A new share. The only one: what the users hash holds is a dead channel's leftovers.
  if redis.call('HLEN', KEYS[3]) == 1 then redis.call('DEL', KEYS[4], KEYS[5]) end
  if ARGV[4] ~= 'full' then again = 1 end
end
local replaces, added = tonumber(ARGV[5]), tonumber(ARGV[6])
local first = 7
for i = first, first + replaces - 1, 1000 do
  local last = math.min(i + 999, first + replaces - 1)
  redis.call('ZREM', KEYS[1], unpack(ARGV, i, last))
  redis.call('HDEL', KEYS[2], unpack(ARGV, i, last))
end
first = first + replaces
if value == '' or ARGV[4] == 'full' then
  local wanted = {}
  for i = first, first + added - 1 do wanted[ARGV[i]] = true end
  for _, user in ipairs(held_by(KEYS[5], node)) do
    if not wanted[user] then unhold(KEYS[4], KEYS[5], node, user) end
  end
end
for i = first, first + added - 1 do hold(KEYS[4], KEYS[5], node, ARGV[i]) end
for i = first + added, #ARGV do unhold(KEYS[4], KEYS[5], node, ARGV[i]) end
if value ~= '' then
  keep(KEYS[3], ms)
  redis.call('PEXPIRE', KEYS[4], ms); redis.call('PEXPIRE', KEYS[5], ms)
end
return again
"""
)

# KEYS bucket hash; ARGV 1 now ms, 2 rate per second, 3 burst, 4 key ttl ms. A token bucket
# shared by every gateway process: {1, 0} taken, {0, ms until a token is there} refused.
# Tokens are kept as text with 17 significant digits: a Lua number survives the round trip.
_RATE_TAKE = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 't', 's')
local tokens, stamp = tonumber(held[1]), tonumber(held[2])
if not tokens or not stamp then tokens = burst; stamp = now end
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate / 1000)
  stamp = now
end
local taken = 0
if tokens >= 1 then tokens = tokens - 1; taken = 1 end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', stamp)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if taken == 1 then return {1, 0} end
if rate <= 0 then return {0, -1} end
return {0, math.ceil((1 - tokens) * 1000 / rate)}
"""

# KEYS counts hash; ARGV 1 node, 2 'count:until' or '' to withdraw, 3 ttl ms.
_COUNT_REPORT = (
    _PRUNE
    + """
report(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
return 1
"""
)

# KEYS counts hash; ARGV 1 now ms. The sum of the reports still live; the dead ones go.
_COUNT_READ = """
local all = redis.call('HGETALL', KEYS[1])
local now, total, dead = tonumber(ARGV[1]), 0, {}
for i = 1, #all, 2 do
  local count, untl = string.match(all[i + 1], '^(%d+):(%d+)$')
  if count and tonumber(untl) > now then total = total + tonumber(count)
  else dead[#dead + 1] = all[i] end
end
if #dead > 0 then redis.call('HDEL', KEYS[1], unpack(dead)) end
return total
"""


class _Body(msgspec.Struct, array_like=True, frozen=True):
    """A publication as stored and published, less its channel, epoch and offset."""

    kind: str
    user: str
    time_ms: int
    data: bytes


class _Member(msgspec.Struct, array_like=True, frozen=True):
    user: str
    info: bytes


_body_encoder = msgspec.msgpack.Encoder()
_body_decoder = msgspec.msgpack.Decoder(_Body)
_member_decoder = msgspec.msgpack.Decoder(_Member)

# Errors that mean "the store does not answer" (the gateway degrades) rather than "the request
# is wrong" (a bug or bad input).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.ClusterError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.ReadOnlyError,
    rexc.SlotNotCoveredError,
    rexc.RedisClusterUnreachableError,
    OSError,
    asyncio.TimeoutError,
)


def _tag(channel: str) -> str:
    """The channel as a hash tag: braces would end the tag early and split a channel's keys
    over several slots, so they (and the escape character) are escaped; injective."""
    return channel.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def channel_key(prefix: str, channel: str, part: str) -> str:
    """The key of one part of a channel: ``<prefix>{<channel>}:<part>``."""
    return f"{prefix}{{{_tag(channel)}}}:{part}"


def _seq_text(seq: int) -> str:
    if not -_SEQ_BOUND <= seq < _SEQ_BOUND:
        raise BrokerError(f"a state sequence number must fit in 64 bits, not {seq}")
    return f"{seq + _SEQ_BOUND:020d}"


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pack(*args: bytes | str | int) -> bytes:
    """A command in RESP, for the pub/sub connections this module reads itself."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Link:
    """One pub/sub connection to one Redis server: subscribes, reads, pings, reconnects.

    ``wanted`` is what should be subscribed; ``lost`` what was subscribed when the connection
    dropped (its deliveries may be gone) and is not yet subscribed again."""

    def __init__(self, broker: RedisBroker, host: str, port: int) -> None:
        self.broker = broker
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.wanted: set[bytes] = set()
        self.confirmed: set[bytes] = set()
        self.lost: set[bytes] = set()
        self.waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self.connected = False
        self.failed = False  # lost and not yet back with every subscription in place
        self._writer: asyncio.StreamWriter | None = None
        self._task = asyncio.create_task(self._run(), name=f"realtime-redis-link-{self.address}")

    @property
    def up(self) -> bool:
        return not self.failed and not self.lost

    def _send(self, *args: bytes | str) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_pack(*args))

    def _subscribe_command(self) -> str:
        return "SSUBSCRIBE" if self.broker.sharded else "SUBSCRIBE"

    async def subscribe(self, name: bytes, timeout: float) -> None:
        self.wanted.add(name)
        if name in self.confirmed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(name, []).append(waiter)
        self._send(self._subscribe_command(), name)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise BrokerUnavailable(
                f"Redis at {self.address} did not confirm a subscription"
            ) from None

    def unsubscribe(self, name: bytes) -> None:
        self.wanted.discard(name)
        self.lost.discard(name)
        self.confirmed.discard(name)
        if self.connected:
            self._send("SUNSUBSCRIBE" if self.broker.sharded else "UNSUBSCRIBE", name)

    def adopt(self, name: bytes) -> None:
        """Take over a channel whose deliveries may have been lost on another connection."""
        self.wanted.add(name)
        self.lost.add(name)
        self._send(self._subscribe_command(), name)

    def _fail_waiters(self, error: BaseException) -> None:
        for waiters in self.waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
        self.waiters.clear()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._fail_waiters(BrokerUnavailable("the broker node is closed"))

    async def _run(self) -> None:
        backoff = self.broker.backoff_min
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    _log.warning("Redis pub/sub at %s lost: %r", self.address, exc)
                    backoff = self.broker.backoff_min
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            self.connected = False
            self.failed = True
            self.lost |= self.confirmed | self.wanted
            self.confirmed.clear()
            self._fail_waiters(BrokerUnavailable(f"Redis at {self.address} does not answer"))
            if not self.wanted:  # nothing to resubscribe: the next subscribe opens a fresh link
                self.broker._forget_link(self)
                return
            # Full jitter: a thousand gateway processes must not all come back in one instant.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, self.broker.backoff_max)
            await self.broker._rehome(self)

    async def _session(self) -> None:
        broker = self.broker
        async with asyncio.timeout(broker.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        self._writer = writer
        parser = hiredis.Reader()
        if broker._password is not None:
            auth = ("AUTH", broker._username, broker._password) if broker._username else None
            self._send(*(auth or ("AUTH", broker._password)))
        # Connected means the server answered, not that the TCP handshake went through: a proxy
        # or a load balancer in front of a dead Redis accepts and then resets.
        self._send("PING")
        async with asyncio.timeout(broker.connect_timeout):
            while True:
                reply = await self._read_one(reader, parser)
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"Redis refused the connection: {reply}")
                if reply == b"PONG":
                    break
        self.connected = True
        for name in sorted(self.wanted):  # one by one: a cluster refuses channels of 2 slots
            self._send(self._subscribe_command(), name)
        if not self.lost:
            self.failed = False
        waiting_pong = False
        while True:
            message = parser.gets()
            if message is False:
                try:
                    async with asyncio.timeout(broker.ping_interval):
                        data = await reader.read(1 << 16)
                except TimeoutError:
                    if waiting_pong:
                        raise ConnectionError("no answer to PING") from None
                    self._send("PING")
                    waiting_pong = True
                    continue
                if not data:
                    raise ConnectionError("closed by the server")
                parser.feed(data)
                waiting_pong = False
                continue
            self._handle(message)

    async def _read_one(self, reader: asyncio.StreamReader, parser: hiredis.Reader) -> Any:
        while (message := parser.gets()) is False:
            data = await reader.read(1 << 16)
            if not data:
                raise ConnectionError("closed by the server")
            parser.feed(data)
        return message

    def _handle(self, message: Any) -> None:
        if isinstance(message, hiredis.ReplyError):
            # A MOVED for a subscription (the slot went to another shard): reconnect, rehome.
            raise ConnectionError(f"Redis refused a subscription: {message}")
        if not isinstance(message, list) or not message:
            return
        kind = message[0]
        if kind in (b"message", b"smessage"):
            self.broker._on_message(message[1], message[2])
        elif kind in (b"subscribe", b"ssubscribe"):
            self._confirmed(message[1])
        elif kind in (b"unsubscribe", b"sunsubscribe") and message[1] in self.wanted:
            # Not asked for: the server dropped it (its slot moved). Treat it as a loss.
            raise ConnectionError(f"Redis dropped the subscription to {message[1]!r}")

    def _confirmed(self, name: bytes) -> None:
        if name not in self.wanted:
            self._send("SUNSUBSCRIBE" if self.broker.sharded else "UNSUBSCRIBE", name)
            return
        self.confirmed.add(name)
        for waiter in self.waiters.pop(name, []):
            if not waiter.done():
                waiter.set_result(None)
        if self.lost and self.lost <= self.confirmed:
            returned = frozenset(self.lost)
            self.lost.clear()
            self.failed = False
            self.broker._returned(returned)


class RedisBroker:
    """One gateway process's node on a Redis or a Redis Cluster. See the module docstring.

    The broker owns ``client`` and closes it. ``sharded`` (a cluster) publishes with
    ``SPUBLISH``; a single Redis uses plain pub/sub (Redis 6 and later)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Clock = time.time,
        node: str | None = None,
        meta_ttl: float = DEFAULT_META_TTL,
        connect_timeout: float = 2.0,
        ping_interval: float = 5.0,
        subscribe_timeout: float = 5.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        max_inflight: int = 64,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise BrokerError(f"a key prefix must not hold braces (hash tags): {prefix!r}")
        self._client = client
        self.sharded = isinstance(client, RedisCluster)
        self.prefix = prefix
        self.clock = clock
        self._node = node or f"redis-{secrets.token_hex(6)}"
        self.meta_ttl_ms = int(meta_ttl * 1000)
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.subscribe_timeout = subscribe_timeout
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        kwargs = client.get_connection_kwargs() if self.sharded else _pool_kwargs(client)
        self._username: str | None = kwargs.get("username")
        self._password: str | None = kwargs.get("password")
        if kwargs.get("ssl") or "ssl_cert_reqs" in kwargs or _uses_tls(client):
            # The pub/sub connections are this module's own; cleartext beside TLS commands would
            # leak every publication, so TLS is refused until those connections speak it too.
            raise BrokerError("the realtime Redis engine does not speak TLS yet (rediss://)")
        if "host" not in kwargs and not self.sharded:
            raise BrokerError("the realtime Redis engine needs a TCP address, not a socket path")
        self._subs: dict[str, list[Deliver]] = {}
        self._names: dict[bytes, str] = {}
        self._links: dict[str, _Link] = {}
        self._home: dict[bytes, _Link] = {}
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._listeners: list[RecoveryListener] = []
        self._reported: set[str] = set()
        self._shared: set[str] = set()
        self._held: dict[str, frozenset[str]] = {}  # channel -> this node's users Redis holds
        # One presence report at a time: two in flight at once (a tick's and a channel's move)
        # could land in either order, and a report's users are a change from the one before.
        self._reporting = asyncio.Lock()
        self._commands_down: str | None = None
        self._closed = False
        # Commands in flight at once from this node. redis-py's pool refuses a command past its
        # connection limit ("Too many connections", 100 by default) instead of waiting: in a
        # reconnect storm a gateway runs a presence join and a recovery per arriving client at
        # once, and every one past the limit would be answered "broker unavailable". Past this
        # many they wait their turn; it stays under the pool's limit (per node in a cluster).
        self._inflight = asyncio.Semaphore(max(1, max_inflight))
        register = client.register_script
        self._publish = register(_PUBLISH)
        self._state_write = register(_STATE_WRITE)
        self._read = register(_READ)
        self._presence_join = register(_PRESENCE_JOIN)
        self._presence_refresh = register(_PRESENCE_REFRESH)
        self._presence_stats = register(_PRESENCE_STATS)
        self._presence_share = register(_PRESENCE_SHARE)
        self._count_report = register(_COUNT_REPORT)
        self._count_read = register(_COUNT_READ)
        self._rate_take = register(_RATE_TAKE)

    @classmethod
    def connect(cls, url: str, *, cluster: bool = False, **options: Any) -> RedisBroker:
        """A node on the Redis (or, with ``cluster``, the Redis Cluster) at ``url``. A
        ``prefix`` query parameter sets the key prefix (several events or tenants on one Redis:
        ``redis://host:6379/0?prefix=final:``)."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [v for k, v in query if k == "prefix"]
        if prefixes:
            options = {"prefix": prefixes[-1], **options}
            rest = urlencode([(k, v) for k, v in query if k != "prefix"])
            url = urlunsplit(parts._replace(query=rest))
        settings = client_options(options.get("connect_timeout", 2.0))
        client: RedisClient
        # A surge of handshakes runs hundreds of commands at once. redis-py's pools answer the
        # 101st concurrent one with "Too many connections", a ConnectionError the engine must
        # take for a lost Redis (every channel then recovers or resets). So the single-Redis
        # pool waits for a free connection instead, and a cluster's per-node pools are sized for
        # a surge.
        if cluster:
            client = RedisCluster.from_url(url, max_connections=POOL_CONNECTIONS, **settings)
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=POOL_CONNECTIONS,
                timeout=settings["socket_timeout"],
                **settings,
            )
            client = aioredis.Redis.from_pool(pool)
        return cls(client, **options)

    @property
    def node(self) -> str:
        return self._node

    async def start(self) -> None:
        """Check that the store answers (and learn a cluster's shards)."""
        await self._call(self._client.ping())

    async def close(self) -> None:
        self._closed = True
        self._subs.clear()
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()
        self._home.clear()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    # -- plumbing -----------------------------------------------------------------------------

    def _key(self, channel: str, part: str) -> str:
        if not channel:
            raise BrokerError("a channel name must not be empty")
        return channel_key(self.prefix, channel, part)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _call(self, awaitable: Any) -> Any:
        if self._closed:
            raise BrokerError("the broker node is closed")
        try:
            async with self._inflight:
                result = await cancellable(awaitable)
        except _UNAVAILABLE as exc:
            self._commands_down = f"Redis does not answer: {exc}"
            raise BrokerUnavailable(self._commands_down) from exc
        except rexc.ResponseError as exc:
            if str(exc).startswith(("OOM", "LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN")):
                self._commands_down = f"Redis refuses work: {exc}"
                raise BrokerUnavailable(self._commands_down) from exc
            raise BrokerError(f"Redis refused the operation: {exc}") from exc
        self._commands_down = None
        return result

    # -- publications -------------------------------------------------------------------------

    def _append_args(self, channel: str, body: _Body, size: int, ttl: float) -> list[Arg]:
        return [
            secrets.token_hex(6),
            _body_encoder.encode(body),
            body.time_ms,
            max(size, 0),
            max(int(ttl * 1000), 0),
            self.meta_ttl_ms,
            "SPUBLISH" if self.sharded else "PUBLISH",
            self._key(channel, "p"),
        ]

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        kind: str = "message",
        user: str = "",
        history_size: int,
        history_ttl: float,
    ) -> Position:
        body = _Body(kind=kind, user=user, time_ms=self._now_ms(), data=data)
        keys = [self._key(channel, "m"), self._key(channel, "h")]
        args = self._append_args(channel, body, history_size, history_ttl)
        _, epoch, offset = await self._call(self._publish(keys=keys, args=args))
        return Position(_text(epoch), _int(offset))

    def _publication(self, channel: str, epoch: str, entry: Any) -> Publication:
        entry_id, fields = entry
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        body = _body_decoder.decode(values[b"b"])
        return Publication(
            channel=channel,
            epoch=epoch,
            offset=int(entry_id.split(b"-", 1)[0]),
            data=body.data,
            kind=body.kind,
            user=body.user,
            time_ms=body.time_ms,
        )

    async def _read_stream(
        self, channel: str, mode: str, epoch: str, first: int, count: int
    ) -> tuple[Position, int, list[Publication]]:
        keys = [self._key(channel, "m"), self._key(channel, "h")]
        args: list[Arg] = [secrets.token_hex(6), self.meta_ttl_ms, mode, epoch, first, count]
        top_epoch, top, oldest, entries = await self._call(self._read(keys=keys, args=args))
        top_epoch = _text(top_epoch)
        pubs = [self._publication(channel, top_epoch, entry) for entry in entries]
        return Position(top_epoch, _int(top)), _int(oldest), pubs

    async def recover(self, channel: str, since: Position, *, limit: int) -> Recovered:
        first = since.offset + 1
        count = max(limit, 0) if 0 <= since.offset < _MAX_SAFE else 0
        top, oldest, pubs = await self._read_stream(channel, "range", since.epoch, first, count)
        wanted = missed_range(since, top, oldest, limit)
        # The entries read must be exactly the ones missed: a stream that lost entries behind the
        # meta's back (expired, evicted) answers "not recovered", never a partial recovery.
        if wanted is None or [p.offset for p in pubs] != list(wanted):
            return Recovered(recovered=False, publications=[], top=top)
        return Recovered(recovered=True, publications=pubs, top=top)

    async def history(self, channel: str, *, limit: int) -> HistoryPage:
        top, _, pubs = await self._read_stream(channel, "newest", "", 0, max(limit, 0))
        return HistoryPage(publications=pubs[::-1], top=top)

    # -- fan-out ------------------------------------------------------------------------------

    async def _owner(self, name: bytes) -> tuple[str, int]:
        if isinstance(self._client, RedisCluster):
            client = self._client
            if client._initialize:
                await self._call(client.initialize())
            return _slot_owner(client, name)
        kwargs = _pool_kwargs(self._client)
        return str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379))

    def _link(self, host: str, port: int) -> _Link:
        address = f"{host}:{port}"
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _Link(self, host, port)
        return link

    def _forget_link(self, link: _Link) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]

    async def subscribe(self, channel: str, deliver: Deliver) -> None:
        if self._closed:
            raise BrokerError("the broker node is closed")
        callbacks = self._subs.get(channel)
        if callbacks is not None:
            if deliver not in callbacks:
                callbacks.append(deliver)
            pending = self._pending.get(channel)
            if pending is not None:  # the first subscriber's SUBSCRIBE is not confirmed yet
                await asyncio.shield(pending)
            return
        name = self._key(channel, "p").encode()
        self._subs[channel] = [deliver]
        self._names[name] = channel
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[channel] = ready
        try:
            link = self._link(*await self._owner(name))
            self._home[name] = link
            await link.subscribe(name, self.subscribe_timeout)
        except BaseException:
            self._drop(channel, name)
            ready.set_exception(BrokerUnavailable(f"could not subscribe to {channel!r}"))
            ready.exception()  # retrieved: no "never retrieved" warning when no one else waits
            raise
        else:
            ready.set_result(None)
        finally:
            self._pending.pop(channel, None)

    def _drop(self, channel: str, name: bytes) -> None:
        self._subs.pop(channel, None)
        self._names.pop(name, None)
        link = self._home.pop(name, None)
        if link is not None:
            link.unsubscribe(name)

    async def unsubscribe(self, channel: str, deliver: Deliver) -> None:
        callbacks = self._subs.get(channel)
        if callbacks and deliver in callbacks:
            callbacks.remove(deliver)
            if not callbacks:
                self._drop(channel, self._key(channel, "p").encode())

    def _on_message(self, name: bytes, payload: bytes) -> None:
        channel = self._names.get(name)
        if channel is None:
            return
        try:
            epoch, offset, raw = payload.split(b" ", 2)
            body = _body_decoder.decode(raw)
        except (ValueError, msgspec.DecodeError):
            _log.error("an undecodable publication on %s", channel)
            return
        pub = Publication(
            channel=channel,
            epoch=epoch.decode(),
            offset=int(offset),
            data=body.data,
            kind=body.kind,
            user=body.user,
            time_ms=body.time_ms,
        )
        for deliver in list(self._subs.get(channel, ())):
            try:
                deliver(pub)
            except Exception:  # one failing subscriber must not stop the channel's fan-out
                _log.exception("delivery callback failed on %s", channel)

    async def _rehome(self, link: _Link) -> None:
        """After a lost connection in a cluster: follow each channel to the shard that now holds
        its slot (a failover, a resharding); the new connection makes its subscribers recover."""
        if not isinstance(self._client, RedisCluster) or not link.wanted or self._closed:
            return
        try:
            await cancellable(self._client.initialize())
        except Exception:  # the cluster is not answering yet: try again after the next backoff
            return
        for name in list(link.wanted):
            try:
                host, port = _slot_owner(self._client, name)
            except BrokerUnavailable:
                return
            if (host, port) != (link.host, link.port):
                link.wanted.discard(name)
                link.lost.discard(name)
                target = self._link(host, port)
                self._home[name] = target
                target.adopt(name)

    def _returned(self, names: frozenset[bytes]) -> None:
        """Subscriptions whose deliveries may have been lost are in place again."""
        channels = frozenset(c for n in names if (c := self._names.get(n)) is not None)
        # The pub/sub connection answered: the server is back for commands too.
        self._commands_down = None
        if not channels:
            return
        _log.warning("Redis is back; %d channel(s) recover", len(channels))
        for listener in list(self._listeners):
            try:
                listener(channels)
            except Exception:
                _log.exception("recovery listener failed")

    # -- presence -----------------------------------------------------------------------------

    def _presence_keys(self, channel: str) -> list[str]:
        return [self._key(channel, "z"), self._key(channel, "i")]

    def _share_keys(self, channel: str) -> list[str]:
        return [*self._presence_keys(channel), *(self._key(channel, p) for p in ("a", "u", "au"))]

    async def presence_join(self, channel: str, entry: PresenceEntry, *, ttl: float) -> None:
        now = self._now_ms()
        member = _body_encoder.encode(_Member(user=entry.user, info=entry.info))
        args: list[Arg] = [now, now + int(ttl * 1000), _key_ttl_ms(ttl), entry.client, member]
        await self._call(self._presence_join(keys=self._presence_keys(channel), args=args))

    async def presence_leave(self, channel: str, client: str) -> None:
        zset, entries = self._presence_keys(channel)
        pipe = self._client.pipeline(transaction=False)
        pipe.zrem(zset, client)
        pipe.hdel(entries, client)
        await self._call(pipe.execute())

    async def presence_refresh(self, channel: str, clients: Sequence[str], *, ttl: float) -> None:
        if not clients:
            return
        now = self._now_ms()
        args: list[Arg] = [now, now + int(ttl * 1000), _key_ttl_ms(ttl), *clients]
        await self._call(self._presence_refresh(keys=self._presence_keys(channel), args=args))

    async def presence(self, channel: str) -> list[PresenceEntry]:
        reply = await self._call(
            self._presence_stats(keys=self._share_keys(channel), args=[self._now_ms()])
        )
        flat, entries = reply[2:], []
        for client, raw in zip(flat[::2], flat[1::2], strict=True):
            member = _member_decoder.decode(raw)
            entries.append(PresenceEntry(client=_text(client), user=member.user, info=member.info))
        return sorted(entries, key=lambda e: e.client)

    async def presence_stats(self, channel: str) -> PresenceStats:
        reply = await self._call(
            self._presence_stats(keys=self._share_keys(channel), args=[self._now_ms()])
        )
        listed = {_member_decoder.decode(raw).user for raw in reply[3::2]}
        shared, users = _int(reply[0]), _int(reply[1])
        if listed and users:
            # Shares and entries at once (a channel moving between them): a user in both
            # counts once. The entries are few then, and this is rare: not worth a script.
            held = await self._call(self._client.hmget(self._key(channel, "u"), sorted(listed)))
            listed = {u for u, n in zip(sorted(listed), held, strict=True) if n is None}
        return PresenceStats(
            clients=shared + len(reply[2::2]), users=users + len(listed), shared=shared
        )

    async def report_presence(self, shares: Mapping[str, PresenceShare], *, ttl: float) -> None:
        async with self._reporting:
            await self._report_presence(shares, ttl)

    async def _report_presence(self, shares: Mapping[str, PresenceShare], ttl: float) -> None:
        until = self._now_ms() + int(ttl * 1000)
        key_ttl = _key_ttl_ms(ttl)

        def call(channel: str, share: PresenceShare) -> tuple[list[str], list[Arg]]:
            value = f"{share.clients}:{len(share.users)}:{until}"
            # Only the users that came or went since the last report: a large channel's
            # viewers cost Redis nothing while they stay, however many they are.
            held = self._held.pop(channel, None)
            mode, added, removed = (
                ("full", share.users, frozenset())
                if held is None
                else ("delta", share.users - held, held - share.users)
            )
            args: list[Arg] = [self._node, value, key_ttl, mode, len(share.replaces), len(added)]
            return self._share_keys(channel), [*args, *share.replaces, *added, *removed]

        # What Redis holds of this node's users is unknown from here until a report is
        # answered: a failed one is followed by a full one.
        calls = [call(channel, share) for channel, share in shares.items()]
        withdrawn = self._shared - shares.keys()
        calls += [(self._share_keys(c), [self._node, "", 0, "full", 0, 0]) for c in withdrawn]
        for channel in withdrawn:
            self._held.pop(channel, None)
        # Remembered before sending, as the counts are: a failed report is withdrawn next time.
        self._shared |= set(shares)
        if calls:
            again = await self._pipelined(self._presence_share, calls)
            lost = {c: s for (c, s), a in zip(shares.items(), again, strict=False) if _int(a)}
            if lost:  # shares found gone with their users (expired, or Redis lost them)
                await self._pipelined(self._presence_share, [call(c, s) for c, s in lost.items()])
            self._held.update((c, s.users) for c, s in shares.items())
        self._shared = set(shares)

    # -- state channels -----------------------------------------------------------------------

    async def state_write(
        self, channel: str, value: StateValue, *, history_size: int, history_ttl: float
    ) -> StateWrite:
        encoded = state_data(value)
        body = _Body(kind="state", user="", time_ms=self._now_ms(), data=encoded)
        keys = [
            self._key(channel, "m"),
            self._key(channel, "h"),
            self._key(channel, "s"),
            self._key(channel, "q"),
        ]
        args = self._append_args(channel, body, history_size, history_ttl)
        args += [value.key, _seq_text(value.seq), encoded]
        reply = await self._call(self._state_write(keys=keys, args=args))
        if _int(reply[0]) == 0:
            return StateWrite(applied=False, current=state_from_data(reply[1]), position=None)
        return StateWrite(
            applied=True, current=value, position=Position(_text(reply[1]), _int(reply[2]))
        )

    async def state(self, channel: str) -> dict[str, StateValue]:
        values = await self._call(self._client.hgetall(self._key(channel, "s")))
        return {_text(k): state_from_data(v) for k, v in values.items()}

    # -- rate limits --------------------------------------------------------------------------

    async def rate_take(self, channel: str, user: str, *, rate: float, burst: int) -> RateTaken:
        # The user's bucket carries the channel's hash tag: on the channel's shard in a cluster.
        key = self._key(channel, f"r:{user}")
        # Idle long enough to be full again, the bucket is the same as none: it expires then.
        refill_ms = math.ceil(burst / rate * 1000) if rate > 0 else self.meta_ttl_ms
        args: list[Arg] = [self._now_ms(), repr(float(rate)), burst, refill_ms + 1000]
        taken, wait_ms = await self._call(self._rate_take(keys=[key], args=args))
        if _int(taken):
            return RateTaken(taken=True)
        wait = _int(wait_ms)
        return RateTaken(taken=False, wait_ms=wait if wait >= 0 else 2**31)

    # -- viewer counts ------------------------------------------------------------------------

    async def _pipelined(self, script: Any, calls: list[tuple[list[str], list[Arg]]]) -> Any:
        """One script over many channels in one round trip per server. A pipeline cannot load
        a script a server lacks (a fresh or restarted one), so that is done and tried again."""
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return await self._call(pipe.execute())
            except BrokerError as exc:
                if attempt or not _no_script(exc.__cause__):
                    raise
                await self._call(self._client.script_load(script.script))
        raise AssertionError("unreachable")

    async def report_counts(self, counts: Mapping[str, int], *, ttl: float) -> None:
        until = self._now_ms() + int(ttl * 1000)
        calls: list[tuple[list[str], list[Arg]]] = [
            ([self._key(c, "c")], [self._node, f"{max(int(n), 0)}:{until}", _key_ttl_ms(ttl)])
            for c, n in counts.items()
        ]
        withdrawn = self._reported - counts.keys()
        calls += [([self._key(c, "c")], [self._node, "", 0]) for c in withdrawn]
        # Remembered before sending: after a failure the next report withdraws what this one
        # may have written.
        self._reported |= set(counts)
        if calls:
            await self._pipelined(self._count_report, calls)
        self._reported = set(counts)

    async def counts(self, channels: Sequence[str]) -> CountReport:
        unique = list(dict.fromkeys(channels))
        if not unique:
            return CountReport(counts={})
        now = self._now_ms()
        totals = await self._pipelined(
            self._count_read, [([self._key(c, "c")], [now]) for c in unique]
        )
        return CountReport(counts={c: _int(t) for c, t in zip(unique, totals, strict=True)})

    # -- health -------------------------------------------------------------------------------

    def health(self) -> Health:
        down = sorted(link.address for link in self._links.values() if not link.up)
        if down:
            return Health(ok=False, detail=f"Redis pub/sub lost at {', '.join(down)}")
        if self._commands_down is not None:
            return Health(ok=False, detail=self._commands_down)
        return Health(ok=True)

    def on_recovered(self, listener: RecoveryListener) -> None:
        self._listeners.append(listener)


POOL_CONNECTIONS = 256  # commands in flight from one gateway process at once


def client_options(connect_timeout: float = 2.0) -> dict[str, Any]:
    """The redis-py client settings the engine is meant to run with (``RedisBroker.connect``
    uses them; pass them when building a client of your own)."""
    return {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": 5.0,
        # One quick retry: past it the store is down and the gateway degrades now, instead of
        # redis-py's default of three retries with backoff (seconds of silence).
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
    }


def _slot_owner(client: RedisCluster, name: bytes) -> tuple[str, int]:
    """The primary that serves the slot of pub/sub channel ``name``, as the client knows it."""
    node = client.get_node_from_key(name.decode())
    if node is None:
        raise BrokerUnavailable(f"no Redis Cluster node serves {name!r}")
    return str(node.host), int(node.port)


def _no_script(exc: BaseException | None) -> bool:
    return isinstance(exc, rexc.NoScriptError) or "No matching script" in str(exc)


def _key_ttl_ms(ttl: float) -> int:
    """A presence or count key outlives its newest entry a little (real time): then it goes by
    itself once every process that wrote it has died."""
    return int(math.ceil(ttl + 1.0) * 1000)


def _pool_kwargs(client: Any) -> dict[str, Any]:
    return dict(client.connection_pool.connection_kwargs)


def _uses_tls(client: RedisClient) -> bool:
    if isinstance(client, RedisCluster):
        return False
    return issubclass(client.connection_pool.connection_class, aioredis.SSLConnection)
