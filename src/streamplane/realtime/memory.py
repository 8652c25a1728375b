"""The in-process engine: every gateway "process" is a node on one :class:`MemoryHub`.

It is the embedded default (``make demo``, one process, nothing to set up) and the reference the
behaviour suite holds the Redis engines to. All of it runs on one event loop, so each operation
is atomic without locks. :meth:`MemoryHub.interrupt` and :meth:`MemoryHub.restore` take the
store down and back, the way a Redis restart does, so the gateway's degraded path is exercised
without Redis.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
)
from streamplane.realtime.history import missed_range
from streamplane.realtime.protocol import TokenBucket

__all__ = ["MemoryBroker", "MemoryHub"]

_log = logging.getLogger(__name__)


@dataclass
class _Stream:
    epoch: str
    top: int = 0
    kept: deque[Publication] = field(default_factory=deque)


# Buckets of users who went quiet are full again, the same as no bucket: past this many they are
# dropped, so a long event's chatters do not accumulate.
_BUCKETS_SWEPT_AT = 10_000


def _sweep_full(buckets: dict[tuple[str, str], TokenBucket], now: float) -> None:
    for key in [
        k for k, b in buckets.items() if b.tokens + (now - b.stamp) * b.rate >= b.burst - 1e-9
    ]:
        del buckets[key]


class MemoryHub:
    """The shared store of the nodes of one process."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.down = False
        self._streams: dict[str, _Stream] = {}
        self._presence: dict[str, dict[str, tuple[PresenceEntry, float]]] = {}
        self._shares: dict[str, dict[str, tuple[PresenceShare, float]]] = {}  # channel, node
        self._state: dict[str, dict[str, StateValue]] = {}
        self._counts: dict[str, tuple[float, dict[str, int]]] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._nodes: dict[str, MemoryBroker] = {}

    def node(self, name: str | None = None) -> MemoryBroker:
        """A new node on this hub (not yet started)."""
        return MemoryBroker(self, name or f"mem-{secrets.token_hex(4)}")

    def interrupt(self) -> None:
        """The store stops answering: operations raise, deliveries stop."""
        self.down = True

    def restore(self, *, lose_data: bool = False) -> None:
        """The store answers again; with ``lose_data`` it comes back empty (new epochs), as a
        Redis without persistence does. Every node's listeners then hear of its channels."""
        if lose_data:
            self._streams.clear()
            self._presence.clear()
            self._shares.clear()
            self._state.clear()
            self._counts.clear()
            self._buckets.clear()
        self.down = False
        for node in list(self._nodes.values()):
            node._recovered()

    # -- used by the nodes --------------------------------------------------------------------

    def _check(self) -> None:
        if self.down:
            raise BrokerUnavailable("the in-memory broker is interrupted")

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(epoch=secrets.token_hex(4))
        return stream

    def _append(
        self, channel: str, data: bytes, kind: str, user: str, size: int, ttl: float
    ) -> Position:
        if not channel:
            raise BrokerError("a channel name must not be empty")
        stream = self._stream(channel)
        stream.top += 1
        now_ms = self._now_ms()
        pub = Publication(
            channel=channel,
            epoch=stream.epoch,
            offset=stream.top,
            data=data,
            kind=kind,
            user=user,
            time_ms=now_ms,
        )
        kept = stream.kept
        kept.append(pub)
        ttl_ms = int(ttl * 1000)
        while kept and (len(kept) > size or now_ms - kept[0].time_ms > ttl_ms):
            kept.popleft()
        for node in list(self._nodes.values()):
            node._deliver(pub)
        return pub.position


class MemoryBroker:
    """One node (one gateway process) on a :class:`MemoryHub`."""

    def __init__(self, hub: MemoryHub, node: str) -> None:
        self._hub = hub
        self._node = node
        self._subs: dict[str, list[Deliver]] = {}
        self._listeners: list[RecoveryListener] = []
        self._shared: set[str] = set()  # channels this node reported a presence share on

    @property
    def node(self) -> str:
        return self._node

    async def start(self) -> None:
        self._hub._nodes[self._node] = self

    async def close(self) -> None:
        self._hub._nodes.pop(self._node, None)
        self._subs.clear()

    # -- publications -------------------------------------------------------------------------

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
        self._hub._check()
        return self._hub._append(channel, data, kind, user, history_size, history_ttl)

    async def recover(self, channel: str, since: Position, *, limit: int) -> Recovered:
        self._hub._check()
        stream = self._hub._stream(channel)
        kept = list(stream.kept)
        top = Position(stream.epoch, stream.top)
        oldest = kept[0].offset if kept else stream.top + 1
        wanted = missed_range(since, top, oldest, limit)
        if wanted is None:
            return Recovered(recovered=False, publications=[], top=top)
        return Recovered(
            recovered=True, publications=[p for p in kept if p.offset in wanted], top=top
        )

    async def history(self, channel: str, *, limit: int) -> HistoryPage:
        self._hub._check()
        stream = self._hub._stream(channel)
        kept = list(stream.kept)
        return HistoryPage(
            publications=kept[-limit:] if limit > 0 else [],
            top=Position(stream.epoch, stream.top),
        )

    async def subscribe(self, channel: str, deliver: Deliver) -> None:
        self._hub._check()
        callbacks = self._subs.setdefault(channel, [])
        if deliver not in callbacks:
            callbacks.append(deliver)

    async def unsubscribe(self, channel: str, deliver: Deliver) -> None:
        callbacks = self._subs.get(channel)
        if callbacks and deliver in callbacks:
            callbacks.remove(deliver)
            if not callbacks:
                del self._subs[channel]

    def _deliver(self, pub: Publication) -> None:
        for deliver in list(self._subs.get(pub.channel, ())):
            try:
                deliver(pub)
            except Exception:  # one failing subscriber must not stop the channel's fan-out
                _log.exception("delivery callback failed on %s", pub.channel)

    # -- presence -----------------------------------------------------------------------------

    async def presence_join(self, channel: str, entry: PresenceEntry, *, ttl: float) -> None:
        self._hub._check()
        members = self._hub._presence.setdefault(channel, {})
        members[entry.client] = (entry, self._hub.clock() + ttl)

    async def presence_leave(self, channel: str, client: str) -> None:
        self._hub._check()
        members = self._hub._presence.get(channel)
        if members is not None:
            members.pop(client, None)

    async def presence_refresh(self, channel: str, clients: Sequence[str], *, ttl: float) -> None:
        self._hub._check()
        members = self._hub._presence.get(channel, {})
        until = self._hub.clock() + ttl
        for client in clients:
            held = members.get(client)
            if held is not None:
                members[client] = (held[0], until)

    async def presence(self, channel: str) -> list[PresenceEntry]:
        self._hub._check()
        members = self._hub._presence.get(channel, {})
        now = self._hub.clock()
        for client in [c for c, (_, until) in members.items() if until <= now]:
            del members[client]
        return [members[c][0] for c in sorted(members)]

    async def presence_stats(self, channel: str) -> PresenceStats:
        entries = await self.presence(channel)
        shares = self._hub._shares.get(channel, {})
        now = self._hub.clock()
        for node in [n for n, (_, until) in shares.items() if until <= now]:
            del shares[node]
        shared = sum(s.clients for s, _ in shares.values())
        users = {e.user for e in entries}.union(*(s.users for s, _ in shares.values()))
        return PresenceStats(clients=len(entries) + shared, users=len(users), shared=shared)

    async def report_presence(self, shares: Mapping[str, PresenceShare], *, ttl: float) -> None:
        self._hub._check()
        until = self._hub.clock() + ttl
        for channel in self._shared - shares.keys():
            self._hub._shares.get(channel, {}).pop(self._node, None)
        for channel, share in shares.items():
            self._hub._shares.setdefault(channel, {})[self._node] = (share, until)
            members = self._hub._presence.get(channel, {})
            for client in share.replaces:
                members.pop(client, None)
        self._shared = set(shares)

    # -- state channels -----------------------------------------------------------------------

    async def state_write(
        self, channel: str, value: StateValue, *, history_size: int, history_ttl: float
    ) -> StateWrite:
        self._hub._check()
        values = self._hub._state.setdefault(channel, {})
        current = values.get(value.key)
        if current is not None and value.seq <= current.seq:
            return StateWrite(applied=False, current=current, position=None)
        values[value.key] = value
        position = self._hub._append(
            channel, state_data(value), "state", "", history_size, history_ttl
        )
        return StateWrite(applied=True, current=value, position=position)

    async def state(self, channel: str) -> dict[str, StateValue]:
        self._hub._check()
        return dict(self._hub._state.get(channel, {}))

    # -- rate limits --------------------------------------------------------------------------

    async def rate_take(self, channel: str, user: str, *, rate: float, burst: int) -> RateTaken:
        self._hub._check()
        now = self._hub.clock()
        buckets = self._hub._buckets
        bucket = buckets.get((channel, user))
        if bucket is None:
            if len(buckets) >= _BUCKETS_SWEPT_AT:
                _sweep_full(buckets, now)
            bucket = buckets[(channel, user)] = TokenBucket(rate=rate, burst=burst)
        else:  # the namespace's limits may have changed since the bucket was made
            bucket.rate, bucket.burst = rate, burst
        if bucket.take(now):
            return RateTaken(taken=True)
        wait = bucket.wait_s()
        return RateTaken(taken=False, wait_ms=math.ceil(wait * 1000) if wait < 2**21 else 2**31)

    # -- viewer counts ------------------------------------------------------------------------

    async def report_counts(self, counts: Mapping[str, int], *, ttl: float) -> None:
        self._hub._check()
        self._hub._counts[self._node] = (self._hub.clock() + ttl, dict(counts))

    async def counts(self, channels: Sequence[str]) -> CountReport:
        self._hub._check()
        now = self._hub.clock()
        totals = dict.fromkeys(channels, 0)
        for until, counts in self._hub._counts.values():
            if until > now:
                for channel in channels:
                    totals[channel] += counts.get(channel, 0)
        return CountReport(counts=totals)

    # -- health -------------------------------------------------------------------------------

    def health(self) -> Health:
        if self._hub.down:
            return Health(ok=False, detail="the in-memory broker is interrupted")
        return Health(ok=True)

    def on_recovered(self, listener: RecoveryListener) -> None:
        self._listeners.append(listener)

    def _recovered(self) -> None:
        channels = frozenset(self._subs)
        if not channels:
            return
        for listener in list(self._listeners):
            try:
                listener(channels)
            except Exception:
                _log.exception("recovery listener failed")
