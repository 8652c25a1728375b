"""The broker interface: what a gateway process needs from the engine that joins it to the others.

One Protocol, one file per engine (``memory.py`` in-process, the Redis engines beside it), one
behaviour suite run against each (``tests/realtime/test_broker_behaviour.py``). Everything
crossing the interface is a plain msgspec Struct so that an engine can store it as bytes.

A broker node is what one gateway process holds: several nodes on one backing store (one
:class:`~streamplane.realtime.memory.MemoryHub`, one Redis) are several processes serving one
event. The contract, per concern:

- Publications. :meth:`Broker.publish` appends to the channel's stream and returns its
  :class:`Position` ``(epoch, offset)``: offsets count from 1 without gaps within an epoch; a
  new epoch means the stream was lost (engine restart, history expired) and nothing before it
  can be recovered. The history keeps the last ``history_size`` publications no older than
  ``history_ttl`` seconds.
- Recovery. :meth:`Broker.recover` answers a client's last position with exactly the
  publications after it, in order, or ``recovered=False`` (another epoch, a gap older than the
  history, more missed than ``limit``, a position from the future). Never a partial answer.
- Fan-out. :meth:`Broker.subscribe` registers a delivery callback for a channel; every
  publication from any node reaches every node's callbacks in offset order. A callback must not
  block (the gateway queues). Delivery is at most once: a node that misses a delivery (an
  outage) learns of it through :meth:`Broker.on_recovered` and has its clients recover.
- Presence. One entry per connection, kept for ``ttl`` seconds unless refreshed: a process
  that dies without leaving has its connections expire. A large channel (counts only, no
  join/leave diffs) is not worth an entry per connection: a node reports its *share* instead,
  its own connections there counted (:meth:`Broker.report_presence`, once per tick for all its
  large channels, like the viewer counts), so a reconnect storm costs the store a write per
  process, not per viewer. A share lives ``ttl`` seconds unless reported again: a dead
  process's share disappears, and its users with it. :meth:`Broker.presence_stats` sums the
  entries and the live shares, and counts each user once, whichever nodes and entries hold it;
  :meth:`Broker.presence` lists the entries only.
- State channels. The latest value per key; a write whose source ``seq`` is not above the
  current one is dropped (out of order or duplicate) and reported as not applied. An applied
  write is also published on the channel (``kind="state"``, the encoded :class:`StateValue` as
  data) so subscribers receive it in order with the rest.
- Rate limits. :meth:`Broker.rate_take` takes one token from a user's bucket on a channel,
  one bucket per user and channel on the backing store, so a user with connections on many
  processes (or many connections on one) gets the channel's rate once, not once per process.
- Viewer counts. Each node reports its own connections per channel for ``ttl`` seconds; the
  count is the sum over live reports, so a dead process stops counting.
- Health. :meth:`Broker.health` says whether the backing store answers; operations raise
  :class:`BrokerUnavailable` while it does not. When it returns the engine re-subscribes and
  calls the :meth:`Broker.on_recovered` listeners with the channels whose deliveries may have
  been lost.

Times (presence and count expiry, publication and state times) come from the clock the engine
was built with, so the behaviour suite drives them without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import msgspec

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Clock",
    "CountReport",
    "Deliver",
    "Health",
    "HistoryPage",
    "Position",
    "PresenceEntry",
    "PresenceShare",
    "PresenceStats",
    "Publication",
    "RateTaken",
    "Recovered",
    "RecoveryListener",
    "StateValue",
    "StateWire",
    "StateWrite",
    "state_data",
    "state_from_data",
    "state_wire",
]


class BrokerError(Exception):
    """The broker refused an operation (bad channel name, bad arguments)."""


class BrokerUnavailable(BrokerError):
    """The backing store does not answer; the gateway reports itself degraded."""


class Position(msgspec.Struct, frozen=True):
    """A place in a channel's stream. ``offset`` 0 is "before the first publication"."""

    epoch: str
    offset: int


class Publication(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a channel's stream. ``data`` is the publisher's JSON document, verbatim."""

    channel: str
    epoch: str
    offset: int
    data: bytes
    kind: str = "message"  # "message", "state", "delete", "mute": the protocol gives the meaning
    user: str = ""  # who published; "" for the system (the control plane, a state source)
    time_ms: int = 0  # the broker's clock at publish

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.offset)


class Recovered(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to "what did I miss since ``since``": all of it, or nothing."""

    recovered: bool
    publications: list[Publication]  # empty when not recovered
    top: Position  # the stream's position now: where a client that reloads starts from


class HistoryPage(msgspec.Struct, frozen=True, kw_only=True):
    """The newest publications of a channel (oldest first) and the stream's position."""

    publications: list[Publication]
    top: Position


class PresenceEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One connection present in a channel."""

    client: str  # the connection's id, unique across processes
    user: str
    info: bytes = b""  # a small JSON document the gateway attaches (display name, ...)


class PresenceStats(msgspec.Struct, frozen=True, kw_only=True):
    clients: int
    users: int
    shared: int = 0  # of ``clients``, those counted in nodes' shares (not listed as entries)


class PresenceShare(msgspec.Struct, frozen=True, kw_only=True):
    """One node's connections on a large channel, counted instead of listed."""

    clients: int
    # The distinct users of those connections: a user held by several nodes counts once.
    users: frozenset[str] = frozenset()
    # Entries of this node's own connections the share replaces: dropped in the same atomic
    # step, so that a channel moving from entries to a share never counts a connection twice.
    replaces: tuple[str, ...] = ()


class StateValue(msgspec.Struct, frozen=True, kw_only=True):
    """The latest value of one key of a state channel (a score, an odds or price line)."""

    key: str
    value: bytes  # JSON, verbatim from the source
    seq: int  # the source's sequence number for this key: higher is newer
    source_time_ms: int  # when the source produced it
    max_age_ms: int  # past source_time_ms + max_age_ms a client shows it as stale


class StateWrite(msgspec.Struct, frozen=True, kw_only=True):
    applied: bool  # False: out of order or a duplicate, dropped
    current: StateValue  # the value the channel holds after the write
    position: Position | None  # the publication carrying it, when applied


class RateTaken(msgspec.Struct, frozen=True, kw_only=True):
    """The answer of a rate limit: taken, or how long until a token is there."""

    taken: bool
    wait_ms: int = 0  # when not taken


class CountReport(msgspec.Struct, frozen=True, kw_only=True):
    """Viewer counts of several channels, summed over every live node."""

    counts: dict[str, int]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    detail: str = ""


Clock = Callable[[], float]  # seconds, like time.time
Deliver = Callable[[Publication], None]
RecoveryListener = Callable[[frozenset[str]], None]


@runtime_checkable
class Broker(Protocol):
    """One gateway process's handle on the engine. See the module docstring for the contract."""

    @property
    def node(self) -> str:
        """This node's id, unique among the nodes on one backing store."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop delivering, drop this node's subscriptions; other nodes are unaffected."""
        ...

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
    ) -> Position: ...

    async def recover(self, channel: str, since: Position, *, limit: int) -> Recovered: ...

    async def history(self, channel: str, *, limit: int) -> HistoryPage: ...

    async def subscribe(self, channel: str, deliver: Deliver) -> None:
        """Deliver every later publication of ``channel`` to ``deliver``, in offset order.

        Subscribing the same callback twice is one subscription."""
        ...

    async def unsubscribe(self, channel: str, deliver: Deliver) -> None: ...

    # -- presence -----------------------------------------------------------------------------

    async def presence_join(self, channel: str, entry: PresenceEntry, *, ttl: float) -> None: ...

    async def presence_leave(self, channel: str, client: str) -> None: ...

    async def presence_refresh(
        self, channel: str, clients: Sequence[str], *, ttl: float
    ) -> None: ...

    async def presence(self, channel: str) -> list[PresenceEntry]:
        """The live entries, ordered by client id."""
        ...

    async def presence_stats(self, channel: str) -> PresenceStats:
        """The channel's entries and every node's live share, counted: ``clients`` sums
        them, ``users`` counts each user once, whether it is in one node's share, several, or
        in shares and entries."""
        ...

    async def report_presence(self, shares: Mapping[str, PresenceShare], *, ttl: float) -> None:
        """Replace this node's presence shares (channels absent are withdrawn) for ``ttl``
        seconds."""
        ...

    # -- state channels -----------------------------------------------------------------------

    async def state_write(
        self, channel: str, value: StateValue, *, history_size: int, history_ttl: float
    ) -> StateWrite: ...

    async def state(self, channel: str) -> dict[str, StateValue]: ...

    # -- rate limits --------------------------------------------------------------------------

    async def rate_take(self, channel: str, user: str, *, rate: float, burst: int) -> RateTaken:
        """One token from ``user``'s bucket on ``channel`` (``rate`` a second up to ``burst``,
        full when new or idle), shared by every node."""
        ...

    # -- viewer counts ------------------------------------------------------------------------

    async def report_counts(self, counts: Mapping[str, int], *, ttl: float) -> None:
        """Replace this node's counts (channels absent count 0) for ``ttl`` seconds."""
        ...

    async def counts(self, channels: Sequence[str]) -> CountReport: ...

    # -- health -------------------------------------------------------------------------------

    def health(self) -> Health: ...

    def on_recovered(self, listener: RecoveryListener) -> None:
        """Call ``listener`` with the channels whose deliveries may have been lost, once the
        backing store answers again after an outage and their subscriptions are restored."""
        ...


class StateWire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A :class:`StateValue` as JSON carries it: the value embedded as JSON, not as a string."""

    key: str
    value: msgspec.Raw
    seq: int
    source_time_ms: int
    max_age_ms: int


def state_wire(value: StateValue) -> StateWire:
    return StateWire(
        key=value.key,
        value=msgspec.Raw(value.value),
        seq=value.seq,
        source_time_ms=value.source_time_ms,
        max_age_ms=value.max_age_ms,
    )


def state_data(value: StateValue) -> bytes:
    """The JSON data of the publication that carries an applied state write (every engine's)."""
    return msgspec.json.encode(state_wire(value))


def state_from_data(data: bytes) -> StateValue:
    """The :class:`StateValue` a ``kind="state"`` publication carries."""
    wire = msgspec.json.decode(data, type=StateWire)
    return StateValue(
        key=wire.key,
        value=bytes(wire.value),
        seq=wire.seq,
        source_time_ms=wire.source_time_ms,
        max_age_ms=wire.max_age_ms,
    )
