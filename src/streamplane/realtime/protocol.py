"""The realtime protocol, sans I/O: frames, error codes, and the rules the gateway and clients
follow. Nothing here reads a clock, a socket or a random source; the gateway shell and the
clients pass time in.

Frames are JSON objects tagged by ``type`` (msgspec tagged unions). A client connects with its
token in the URL (``/connect?token=...``: browsers cannot set WebSocket headers), so a forged or
expired token is refused before the upgrade; the first frame it receives is ``connected``.

Client frames: ``subscribe`` (a batch of channels, each with the last position the client
applied), ``unsubscribe`` (a batch), ``publish``, ``state`` (a state-channel source's write),
``delete`` and ``mute`` (moderation), ``presence`` (who is here), ``ping``. Each carries an
``id``; the answer (``reply``, ``subscribed``, ``presence_list``, ``pong`` or ``error``)
repeats it.

Server frames pushed without a request: ``pub`` (a publication, with its ``epoch`` and
``offset``), ``reset`` (the channel could not be recovered: reload its state from ``position``),
``presence`` (joins and leaves, small channels only), ``count`` (viewers, at most once per
second per channel), ``disconnect`` (the code, whether to reconnect, and after how long).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

from streamplane.realtime.broker import (
    Position,
    PresenceEntry,
    Publication,
    StateValue,
    StateWire,
    state_wire,
)

__all__ = [
    "CHAT",
    "DEFAULT_NAMESPACES",
    "STATE",
    "ClientFrame",
    "Code",
    "Count",
    "CountThrottle",
    "Cursor",
    "Delete",
    "Disconnect",
    "ErrorReply",
    "FrameError",
    "Mute",
    "Mutes",
    "Namespace",
    "Ping",
    "Pong",
    "PresenceDiff",
    "PresenceList",
    "PresenceQuery",
    "Publish",
    "Reply",
    "Reset",
    "ServerFrame",
    "SetState",
    "Subscribe",
    "SubscribeItem",
    "Subscribed",
    "SubscribedChannel",
    "TokenBucket",
    "Unsubscribe",
    "Verdict",
    "decode_client_frame",
    "decode_server_frame",
    "disconnect_frame",
    "encode",
    "full_jitter_backoff",
    "is_stale",
    "namespace_of",
    "presence_counted",
    "presence_update",
    "pub_frame",
    "required_right",
    "state_frame",
]


# -- error codes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _CodeInfo:
    reason: str
    reconnect: bool  # False: give up (reconnecting would fail the same way)
    after_ms: int  # the least wait before reconnecting; the client adds full jitter on top
    closes: bool  # the connection is closed after it


class Code(enum.IntEnum):
    """Application codes, in the WebSocket close-code range kept for applications (4000-4999).

    A code that closes the connection is sent in a ``disconnect`` frame and as the close code;
    the others answer one request in an ``error`` frame."""

    BAD_FRAME = 4000
    UNAUTHORIZED = 4001
    TOKEN_EXPIRED = 4002
    FORBIDDEN = 4003
    UNKNOWN_CHANNEL = 4004
    TOO_LARGE = 4009
    MESSAGE_TOO_LARGE = 4011  # a chat message or state value over the channel's limit
    SLOW = 4010
    RATE_LIMITED = 4029
    MUTED = 4030
    NOT_SUBSCRIBED = 4031
    TOO_MANY_CHANNELS = 4032
    UNAVAILABLE = 4503  # the broker is down: retry the request later
    SHUTDOWN = 4100
    OVERLOADED = 4101

    @property
    def info(self) -> _CodeInfo:
        return _CODES[self]


_CODES: Final[Mapping[Code, _CodeInfo]] = {
    Code.BAD_FRAME: _CodeInfo("malformed frame", False, 0, True),
    Code.UNAUTHORIZED: _CodeInfo("invalid token", False, 0, True),
    # The client fetches a fresh token from the control plane, then reconnects.
    Code.TOKEN_EXPIRED: _CodeInfo("token expired", True, 0, True),
    Code.FORBIDDEN: _CodeInfo("forbidden", False, 0, False),
    Code.UNKNOWN_CHANNEL: _CodeInfo("unknown channel", False, 0, False),
    Code.TOO_LARGE: _CodeInfo("frame too large", False, 0, True),
    Code.MESSAGE_TOO_LARGE: _CodeInfo("message too large", False, 0, False),
    Code.SLOW: _CodeInfo("slow consumer", True, 500, True),
    Code.RATE_LIMITED: _CodeInfo("rate limited", False, 1000, False),
    Code.MUTED: _CodeInfo("muted", False, 0, False),
    Code.NOT_SUBSCRIBED: _CodeInfo("not subscribed", False, 0, False),
    Code.TOO_MANY_CHANNELS: _CodeInfo("too many channels", False, 0, False),
    Code.UNAVAILABLE: _CodeInfo("broker unavailable", False, 1000, False),
    Code.SHUTDOWN: _CodeInfo("server shutting down", True, 0, True),
    Code.OVERLOADED: _CodeInfo("server overloaded", True, 1000, True),
}


class FrameError(Exception):
    """A frame the gateway cannot accept; ``code`` says which."""

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(detail)
        self.code = code


# -- frames ---------------------------------------------------------------------------------

_TAG: Final = {
    "tag_field": "type",
    "forbid_unknown_fields": True,
    "kw_only": True,
    "omit_defaults": True,
}


class SubscribeItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    channel: str
    since: Position | None = None  # the last position applied; absent: a fresh subscription


class Subscribe(msgspec.Struct, tag="subscribe", **_TAG):
    id: int
    channels: list[SubscribeItem]


class Unsubscribe(msgspec.Struct, tag="unsubscribe", **_TAG):
    id: int
    channels: list[str]


class Publish(msgspec.Struct, tag="publish", **_TAG):
    id: int
    channel: str
    data: msgspec.Raw


class SetState(msgspec.Struct, tag="state", **_TAG):
    id: int
    channel: str
    key: str
    value: msgspec.Raw
    seq: int
    source_time_ms: int
    max_age_ms: int


class Delete(msgspec.Struct, tag="delete", **_TAG):
    id: int
    channel: str
    offset: int


class Mute(msgspec.Struct, tag="mute", **_TAG):
    id: int
    channel: str
    user: str
    seconds: float


class PresenceQuery(msgspec.Struct, tag="presence", **_TAG):
    id: int
    channel: str


class Ping(msgspec.Struct, tag="ping", **_TAG):
    id: int = 0


ClientFrame = Subscribe | Unsubscribe | Publish | SetState | Delete | Mute | PresenceQuery | Ping


class Connected(msgspec.Struct, tag="connected", **_TAG):
    client: str
    user: str
    expires: int
    ping_s: float


class Reply(msgspec.Struct, tag="reply", **_TAG):
    id: int
    position: Position | None = None  # where a publish landed


class ErrorReply(msgspec.Struct, tag="error", **_TAG):
    id: int
    code: int
    reason: str
    after_ms: int = 0


class PubFrame(msgspec.Struct, tag="pub", **_TAG):
    channel: str
    epoch: str
    offset: int
    kind: str
    user: str
    time_ms: int
    data: msgspec.Raw


StateFrame = StateWire


class SubscribedChannel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    channel: str
    recovered: bool  # False: reload; ``publications`` then holds the channel's recent history
    position: Position
    publications: list[PubFrame]
    state: list[StateFrame] = []
    code: int = 0  # not subscribed: why (FORBIDDEN, UNAVAILABLE, ...)


class Subscribed(msgspec.Struct, tag="subscribed", **_TAG):
    id: int
    channels: list[SubscribedChannel]


class Reset(msgspec.Struct, tag="reset", **_TAG):
    channel: str
    position: Position
    publications: list[PubFrame]
    state: list[StateFrame] = []


class PresenceUser(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    client: str
    user: str


class PresenceDiff(msgspec.Struct, tag="presence", **_TAG):
    channel: str
    joined: list[PresenceUser]
    left: list[str]  # client ids


class PresenceList(msgspec.Struct, tag="presence_list", **_TAG):
    id: int
    channel: str
    clients: int
    users: int
    present: list[PresenceUser] | None  # None for a large channel: counts only


class Count(msgspec.Struct, tag="count", **_TAG):
    channel: str
    viewers: int


class Pong(msgspec.Struct, tag="pong", **_TAG):
    id: int = 0


class Disconnect(msgspec.Struct, tag="disconnect", **_TAG):
    code: int
    reason: str
    reconnect: bool
    after_ms: int


ServerFrame = (
    Connected
    | Reply
    | ErrorReply
    | PubFrame
    | Subscribed
    | Reset
    | PresenceDiff
    | PresenceList
    | Count
    | Pong
    | Disconnect
)

_client_decoder: Final = msgspec.json.Decoder(ClientFrame)
_server_decoder: Final = msgspec.json.Decoder(ServerFrame)
_encoder: Final = msgspec.json.Encoder()


def encode(frame: ServerFrame | ClientFrame) -> bytes:
    return _encoder.encode(frame)


def decode_client_frame(
    data: bytes | bytearray | memoryview | str, *, max_bytes: int
) -> ClientFrame:
    """One client frame, or :class:`FrameError` (TOO_LARGE past ``max_bytes``, BAD_FRAME for
    anything that is not exactly one of the frames above)."""
    if len(data) > max_bytes:
        raise FrameError(Code.TOO_LARGE, f"{len(data)} bytes, at most {max_bytes}")
    try:
        return _client_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise FrameError(Code.BAD_FRAME, str(err)) from None


def decode_server_frame(data: bytes | str) -> ServerFrame:
    return _server_decoder.decode(data)


def pub_frame(pub: Publication) -> PubFrame:
    return PubFrame(
        channel=pub.channel,
        epoch=pub.epoch,
        offset=pub.offset,
        kind=pub.kind,
        user=pub.user,
        time_ms=pub.time_ms,
        data=msgspec.Raw(pub.data),
    )


state_frame = state_wire


def disconnect_frame(code: Code) -> Disconnect:
    info = code.info
    return Disconnect(
        code=int(code), reason=info.reason, reconnect=info.reconnect, after_ms=info.after_ms
    )


# -- channels -------------------------------------------------------------------------------

CHAT: Final = "chat"
STATE: Final = "state"


class Namespace(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a channel prefix (``chat:``, ``state:``) means and the limits it keeps."""

    name: str
    kind: str = CHAT  # CHAT: anyone with "publish" posts; STATE: latest value per key
    history_size: int = 100
    history_ttl: float = 600.0
    max_message_bytes: int = 2048
    rate_per_s: float = 1.0  # per user and channel
    burst: int = 5
    presence_diff_limit: int = 100  # above this many clients: counts only


DEFAULT_NAMESPACES: Final = {
    "chat": Namespace(name="chat"),
    "state": Namespace(name="state", kind=STATE, history_size=50, max_message_bytes=4096),
    # An event channel: counts and presence only, the control plane's announcements.
    "event": Namespace(name="event", history_size=20),
}

_CHANNEL_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:"
)
MAX_CHANNEL_LENGTH: Final = 160  # a namespace and a title id (up to 128)


def namespace_of(channel: str, namespaces: Mapping[str, Namespace]) -> Namespace:
    """The namespace of ``ns:name``; FrameError(UNKNOWN_CHANNEL) for a bad or unknown name."""
    prefix, sep, rest = channel.partition(":")
    if (
        not sep
        or not rest
        or len(channel) > MAX_CHANNEL_LENGTH
        or not _CHANNEL_CHARS.issuperset(channel)
    ):
        raise FrameError(Code.UNKNOWN_CHANNEL, f"{channel[:64]!r} is not a channel name (ns:name)")
    namespace = namespaces.get(prefix)
    if namespace is None:
        raise FrameError(Code.UNKNOWN_CHANNEL, f"no namespace {prefix!r}")
    return namespace


def required_right(frame: ClientFrame, namespace: Namespace) -> str:
    """The right the token must grant on the frame's channel: ``read``, ``publish``,
    ``moderate``. A chat message into a state channel is never allowed: FORBIDDEN."""
    if isinstance(frame, Publish):
        if namespace.kind == STATE:
            raise FrameError(Code.FORBIDDEN, "a state channel takes only state writes")
        return "publish"
    if isinstance(frame, SetState):
        if namespace.kind != STATE:
            raise FrameError(Code.FORBIDDEN, "state writes go to a state channel")
        return "publish"
    if isinstance(frame, Delete | Mute):
        return "moderate"
    return "read"


# -- ordering and recovery ------------------------------------------------------------------


class Verdict(enum.Enum):
    APPLY = "apply"  # the next publication: apply it
    DUPLICATE = "duplicate"  # already applied: drop it
    GAP = "gap"  # something is missing before it (or the epoch changed): recover first


class Cursor:
    """The last position applied per channel: the one rule by which a client (and the gateway,
    for what it has sent each connection) applies each publication once and in order."""

    __slots__ = ("_positions",)

    def __init__(self) -> None:
        self._positions: dict[str, Position] = {}

    def position(self, channel: str) -> Position | None:
        return self._positions.get(channel)

    def positions(self) -> dict[str, Position]:
        return dict(self._positions)

    def judge(self, channel: str, epoch: str, offset: int) -> Verdict:
        at = self._positions.get(channel)
        if at is None or epoch != at.epoch:
            return Verdict.GAP
        if offset <= at.offset:
            return Verdict.DUPLICATE
        return Verdict.APPLY if offset == at.offset + 1 else Verdict.GAP

    def offer(self, channel: str, epoch: str, offset: int) -> Verdict:
        """Judge, and advance past the publication when it is applied."""
        verdict = self.judge(channel, epoch, offset)
        if verdict is Verdict.APPLY:
            self._positions[channel] = Position(epoch, offset)
        return verdict

    def reset(self, channel: str, position: Position) -> None:
        """After a reload (or a fresh subscription): continue from ``position``."""
        self._positions[channel] = position

    def forget(self, channel: str) -> None:
        self._positions.pop(channel, None)


def is_stale(value: StateValue | StateFrame, now_ms: int) -> bool:
    """Past its maximum age a value is shown as stale, never as current."""
    return now_ms - value.source_time_ms > value.max_age_ms


# -- limits and moderation ------------------------------------------------------------------


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def wait_s(self, cost: float = 1.0) -> float:
        """How long until ``cost`` tokens are there (after a refused take)."""
        return max(0.0, (cost - self.tokens) / self.rate) if self.rate > 0 else float("inf")


@dataclass
class Mutes:
    """Muted users per channel, each until a time (seconds)."""

    until: dict[tuple[str, str], float] = field(default_factory=dict)

    def mute(self, channel: str, user: str, until: float) -> None:
        self.until[(channel, user)] = max(until, self.until.get((channel, user), 0.0))

    def is_muted(self, channel: str, user: str, now: float) -> bool:
        end = self.until.get((channel, user))
        if end is None:
            return False
        if end <= now:
            del self.until[(channel, user)]
            return False
        return True


class MuteNotice(msgspec.Struct, frozen=True, kw_only=True):
    """The data of a ``kind="mute"`` publication: every gateway applies it."""

    user: str
    until: float


class DeleteNotice(msgspec.Struct, frozen=True, kw_only=True):
    """The data of a ``kind="delete"`` publication: clients remove the message at ``offset``."""

    offset: int
    by: str


# -- presence and counts --------------------------------------------------------------------


def presence_update(
    channel: str,
    before: Mapping[str, str],
    after: Iterable[PresenceEntry],
    *,
    diff_limit: int,
) -> PresenceDiff | None:
    """The joins and leaves between two snapshots (client -> user), for a channel no larger
    than ``diff_limit``; None when nothing changed or the channel is large (counts only)."""
    now = {e.client: e.user for e in after}
    if len(now) > diff_limit or len(before) > diff_limit:
        return None
    joined = [PresenceUser(client=c, user=u) for c, u in sorted(now.items()) if c not in before]
    left = sorted(c for c in before if c not in now)
    if not joined and not left:
        return None
    return PresenceDiff(channel=channel, joined=joined, left=left)


def presence_counted(
    present: int,
    local: int,
    counted: bool,
    *,
    diff_limit: int,
    small_for: float = 0.0,
    settle: float = 0.0,
) -> bool:
    """Whether one gateway process keeps a channel's presence as a count of its own
    connections (its share, one write per tick) rather than an entry per connection.

    ``present`` is the channel's size as the broker last said, ``local`` this process's
    connections on it, ``counted`` the answer so far. A channel past ``diff_limit`` is counted
    (it sends no join/leave diffs anyway); it goes back to entries only at half the limit and
    once it has stayed there ``settle`` seconds (``small_for``: how long it has): a channel
    hovering at the limit does not move every tick, and a reconnect storm, which empties a
    large channel for a moment, does not turn every returning viewer into an entry."""
    size = max(present, local)
    if not counted:
        return size > diff_limit
    return size > diff_limit // 2 or small_for < settle


@dataclass
class CountThrottle:
    """Viewer-count updates at most once per ``interval`` seconds per channel, only on change."""

    interval: float = 1.0
    _sent: dict[str, tuple[float, int]] = field(default_factory=dict)

    def due(self, channel: str, viewers: int, now: float) -> bool:
        last = self._sent.get(channel)
        if last is not None and (viewers == last[1] or now - last[0] < self.interval):
            return False
        self._sent[channel] = (now, viewers)
        return True

    def forget(self, channel: str) -> None:
        self._sent.pop(channel, None)


def full_jitter_backoff(attempt: int, *, base: float, cap: float, draw: float) -> float:
    """Seconds before reconnect attempt ``attempt`` (0-based): uniform in [0, min(cap,
    base * 2**attempt)), ``draw`` in [0, 1) from the caller's random source. Full jitter spreads
    a reconnect storm evenly instead of in synchronised waves."""
    return float(draw * min(cap, base * 2.0 ** min(attempt, 32)))
