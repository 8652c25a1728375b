"""What a player reports: the heartbeat event, the batch it arrives in, and the record the
stream carries.

A player sends ``POST /v1/heartbeat`` with ``{"session_id": ..., "events": [...]}`` (the same
body from the browser player, the headless viewers and the swarm). Each event is what the
player knows at that moment: position, buffer, the rung it plays and that rung's bitrate, its
throughput estimate, startup time, rebuffers, switches, failovers, the edge serving it, errors.
The session's account, device and title come from the heartbeat token, never from the body.

Validation is per event (:func:`parse_batch`): the envelope must be a JSON object with a session
id and at most ``MAX_EVENTS`` events, else the whole request is refused (:class:`BatchError`);
then each event is decoded on its own, and one that is malformed or carries a non-finite,
negative or absurdly large number is refused with its index and reason, while the rest of the
batch is kept.

Clock skew: a player whose clock runs ahead would stamp events that win every later "latest by
event time" comparison. When a batch's latest event is more than ``MAX_FUTURE_S`` after the
server's clock, every event of the batch is moved back by that much (``skew_s`` records it):
their order is kept and nothing is lost. Events stamped in the past are taken as they are
(a late or replayed event loses to newer ones anyway).

Idempotence: an event is identified by ``(device, session, seq, at)``. ``seq`` is the player's
own counter, increasing over its events; players that send none get ``seq = -1`` and are then
identified by event time alone. Consumers write "latest by event time wins", so a duplicate or
a late event never moves anything backwards.

The stream carries :class:`EventBatch` (one request's accepted events, all of one device, so
they land in one partition in order), encoded with msgpack (:func:`encode_record`). Fields are
only ever added, with defaults, so that records written by an older version still decode.

Pure: no I/O and no clock; ``now`` is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final, get_args

import msgspec

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_EVENTS",
    "MAX_FUTURE_S",
    "BatchError",
    "EventBatch",
    "HeartbeatEvent",
    "HeartbeatRequest",
    "ParsedBatch",
    "PlayerEvent",
    "Refusal",
    "SessionIdentity",
    "decode_record",
    "encode_record",
    "parse_batch",
    "to_events",
]

MAX_EVENTS: Final = 1000  # events in one request
MAX_BODY_BYTES: Final = 64 * 1024  # one request's body (the browser player sends <= 100 events)
MAX_FUTURE_S: Final = 300.0  # an event may be stamped this far after the server's clock

_MAX_TIME: Final = 1e11  # epoch seconds: the year 5138

Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e7)]  # 115 days: no session plays longer
ShortSeconds = Annotated[float, msgspec.Meta(ge=0, le=86_400)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Kbps = Annotated[float, msgspec.Meta(ge=0, le=10_000_000)]  # 10 Gb/s
# Text holds no NUL (PostgreSQL refuses it): refused at the door by parse_batch, which looks
# for it only in a body that has one (a pattern here would run a regular expression on every
# string of every heartbeat)
Name = Annotated[str, msgspec.Meta(max_length=64)]
Word = Annotated[str, msgspec.Meta(max_length=32)]
EpochS = Annotated[float, msgspec.Meta(ge=0, le=_MAX_TIME)]
Seq = Annotated[int, msgspec.Meta(ge=-1, le=2**53)]


class PlayerEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """One event as a player sends it. Unknown fields are ignored (a newer player may say
    more than this version reads)."""

    at: EpochS  # when it happened, epoch seconds (player clock)
    position_s: Seconds
    kind: Word = "position"  # play, pause, seek, rebuffer, bitrate, position; "stop" ends it
    seq: Seq = -1  # the device's counter, increasing; -1: the player keeps none
    phase: Word | None = None  # startup, steady, rebuffering, seeking
    format: Word | None = None  # hls or dash
    buffer_s: ShortSeconds | None = None
    rung: Annotated[int, msgspec.Meta(ge=0, le=1000)] | None = None
    rung_id: Name | None = None
    bitrate_kbps: Kbps | None = None  # the rung's
    throughput_kbps: Kbps | None = None  # the player's estimate
    startup_s: ShortSeconds | None = None
    rebuffers: Count = 0  # since the session started
    rebuffer_s: Seconds = 0.0
    switches: Count = 0
    failovers: Count = 0
    edge: Name | None = None  # the edge serving it
    errors: Count = 0


class _Envelope(msgspec.Struct, kw_only=True):
    session_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    events: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_EVENTS)] = []


class HeartbeatRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/heartbeat``'s body, as the OpenAPI document shows it (each event is read on
    its own: see :func:`parse_batch`)."""

    session_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    events: Annotated[list[PlayerEvent], msgspec.Meta(max_length=MAX_EVENTS)] = []


class Refusal(msgspec.Struct, frozen=True):
    index: int  # in the request's ``events``
    reason: str


class ParsedBatch(msgspec.Struct, frozen=True):
    session_id: str
    events: list[PlayerEvent]  # the accepted ones, in the order sent
    refused: list[Refusal]
    skew_s: float = 0.0  # how far ahead the player's clock ran (its events moved back by it)


class BatchError(ValueError):
    """The request as a whole cannot be read; ``status`` is the HTTP answer it earns."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_EVENT: Final = msgspec.json.Decoder(PlayerEvent)
_WHOLE: Final = msgspec.json.Decoder(HeartbeatRequest)
_NUL_ESCAPE: Final = b"\\u0000"  # how JSON carries a NUL (a raw control byte is invalid JSON)


def _is_text(tp: object) -> bool:
    return tp is str or any(_is_text(a) for a in get_args(tp))


_TEXT: Final = tuple(f.name for f in msgspec.structs.fields(PlayerEvent) if _is_text(f.type))


def parse_batch(body: bytes, now: float) -> ParsedBatch:
    """Validate a heartbeat request's body received at ``now`` (server clock, epoch s).

    Raises :class:`BatchError` for a body that is too large (413) or not a batch (400/422);
    otherwise refuses single events with their reason and keeps the rest."""
    if len(body) > MAX_BODY_BYTES:
        raise BatchError(
            413, "batch_too_large", f"the body is {len(body)} bytes; at most {MAX_BODY_BYTES}"
        )
    nul = _NUL_ESCAPE in body
    if not nul:  # the usual request, every event good: decoded in one pass
        try:
            whole = _WHOLE.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass  # read again below, event by event: what is refused, and why
        else:
            return _skewed(whole.session_id, whole.events, [], now)
    try:
        envelope = _ENVELOPE.decode(body)
    except msgspec.ValidationError as err:
        raise BatchError(422, "invalid", f"not a heartbeat batch: {err}") from None
    except msgspec.DecodeError as err:
        raise BatchError(400, "bad_json", f"the request body is not valid JSON: {err}") from None
    except RecursionError:  # the decoder's depth is Python's recursion limit
        raise BatchError(400, "bad_json", "the request body is nested too deeply") from None
    if "\x00" in envelope.session_id:
        raise BatchError(422, "invalid", f"not a heartbeat batch: {_nul_at('session_id')}")
    kept: list[PlayerEvent] = []
    refused: list[Refusal] = []
    for index, raw in enumerate(envelope.events):
        try:
            event = _EVENT.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as err:
            refused.append(Refusal(index, str(err)))
            continue
        text = next((n for n in _TEXT if "\x00" in (getattr(event, n) or "")), None)
        if text is not None:
            refused.append(Refusal(index, _nul_at(text)))
        else:
            kept.append(event)
    return _skewed(envelope.session_id, kept, refused, now)


def _nul_at(field: str) -> str:
    return f"Expected `str` without NUL characters - at `$.{field}`"


def _skewed(
    session_id: str, kept: list[PlayerEvent], refused: list[Refusal], now: float
) -> ParsedBatch:
    """The batch, its events moved back when the player's clock ran ahead (see the module)."""
    skew = max((e.at for e in kept), default=now) - now
    if skew > MAX_FUTURE_S:
        kept = [msgspec.structs.replace(e, at=max(e.at - skew, 0.0)) for e in kept]
    else:
        skew = 0.0
    return ParsedBatch(session_id, kept, refused, skew)


class SessionIdentity(msgspec.Struct, frozen=True):
    """Who sends a batch, from its verified heartbeat token."""

    account: str
    session: str
    device: str
    title: str


class HeartbeatEvent(msgspec.Struct, kw_only=True, frozen=True):
    """One accepted event as the stream carries it: the player's event and who sent it."""

    account: str
    session: str
    device: str
    title: str
    received_at: float  # server clock, epoch s
    at: float  # player clock, epoch s
    seq: int
    kind: str
    position_s: float
    phase: str | None = None
    format: str | None = None
    buffer_s: float | None = None
    rung: int | None = None
    rung_id: str | None = None
    bitrate_kbps: float | None = None
    throughput_kbps: float | None = None
    startup_s: float | None = None
    rebuffers: int = 0
    rebuffer_s: float = 0.0
    switches: int = 0
    failovers: int = 0
    edge: str | None = None
    errors: int = 0
    skew_s: float = 0.0  # moved back by this much: the player's clock ran ahead
    client: str | None = None  # the player's address as the control plane saw it (QoS networks)

    @property
    def key(self) -> tuple[str, str, int, float]:
        """What identifies this event among duplicates (see the module's docstring)."""
        return (self.device, self.session, self.seq, self.at)


class EventBatch(msgspec.Struct, kw_only=True, frozen=True):
    """One request's accepted events: one device's, in the order sent. A request without
    events is a batch too: it says the session is alive at ``received_at``."""

    device: str
    events: list[HeartbeatEvent]
    account: str = ""
    session: str = ""
    title: str = ""
    received_at: float = 0.0


def to_events(
    who: SessionIdentity,
    events: Sequence[PlayerEvent],
    now: float,
    skew_s: float = 0.0,
    *,
    client: str | None = None,
) -> EventBatch:
    """The stream's record of ``events`` sent by ``who`` from address ``client`` and received
    at ``now``."""
    # Every field of PlayerEvent is a field of HeartbeatEvent: a field added to both is
    # carried without touching this.
    return EventBatch(
        device=who.device,
        account=who.account,
        session=who.session,
        title=who.title,
        received_at=now,
        events=[
            HeartbeatEvent(
                account=who.account,
                session=who.session,
                device=who.device,
                title=who.title,
                received_at=now,
                skew_s=skew_s,
                client=client,
                **msgspec.structs.asdict(e),
            )
            for e in events
        ],
    )


_RECORD_ENCODER: Final = msgspec.msgpack.Encoder()
_RECORD_DECODER: Final = msgspec.msgpack.Decoder(EventBatch)


def encode_record(batch: EventBatch) -> bytes:
    return _RECORD_ENCODER.encode(batch)


def decode_record(data: bytes) -> EventBatch:
    return _RECORD_DECODER.decode(data)
