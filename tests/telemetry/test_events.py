"""The heartbeat batch: a bad event is refused with its reason and the rest kept; a body that
is no batch is refused whole; the stream's record round-trips."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.telemetry import (
    MAX_BODY_BYTES,
    MAX_EVENTS,
    BatchError,
    EventBatch,
    HeartbeatEvent,
    PlayerEvent,
    SessionIdentity,
    decode_record,
    encode_record,
    parse_batch,
    partition_of,
    to_events,
)

NOW = 1_800_000_000.0
_HUGE = 123456789.125  # written as 1e400 into the body (json.dumps would write Infinity)
WHO = SessionIdentity(account="acc", session="s1", device="tv-1", title="demo")


def _event(**kw: Any) -> dict[str, Any]:
    return {"at": NOW - 1, "position_s": 12.5, "kind": "position", **kw}


def _body(events: list[Any], session_id: str = "s1") -> bytes:
    return json.dumps({"session_id": session_id, "events": events}).encode()


def test_a_full_event_from_the_browser_player_is_kept() -> None:
    browser = _event(
        seq=7,
        format="hls",
        phase="steady",
        buffer_s=18.2,
        rung=3,
        rung_id="v3",
        bitrate_kbps=2400.0,
        throughput_kbps=8100.5,
        rebuffers=1,
        rebuffer_s=0.8,
        startup_s=0.9,
        edge="edge-2",
        errors=0,
        failovers=1,
        switches=4,
        something_newer="ignored",  # a newer player's field
    )
    parsed = parse_batch(_body([browser]), NOW)
    assert parsed.refused == [] and len(parsed.events) == 1
    e = parsed.events[0]
    assert (e.seq, e.rung, e.bitrate_kbps, e.edge, e.switches) == (7, 3, 2400.0, "edge-2", 4)


def test_the_old_minimal_event_is_kept_with_defaults() -> None:
    parsed = parse_batch(_body([{"at": NOW, "position_s": 3}]), NOW)
    (e,) = parsed.events
    assert (e.kind, e.seq, e.rebuffers, e.bitrate_kbps) == ("position", -1, 0, None)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"position_s": -1.0}, "$.position_s"),
        ({"position_s": _HUGE}, "$.position_s"),  # 1e400: JSON's way to say infinity
        ({"buffer_s": 1e9}, "$.buffer_s"),
        ({"bitrate_kbps": -5}, "$.bitrate_kbps"),
        ({"throughput_kbps": 1e300}, "$.throughput_kbps"),
        ({"rebuffers": -1}, "$.rebuffers"),
        ({"rebuffers": 10**12}, "$.rebuffers"),
        ({"rebuffers": 1.5}, "$.rebuffers"),
        ({"at": "yesterday"}, "$.at"),
        ({"kind": "x" * 33}, "$.kind"),
        ({"edge": "e\x00"}, "$.edge"),
        ({"seq": -2}, "$.seq"),
        ({"position_s": None}, "$.position_s"),
    ],
)
def test_a_bad_event_is_refused_with_its_reason_and_the_rest_kept(
    bad: dict[str, Any], why: str
) -> None:
    body = _body([_event(seq=1), _event(**{"seq": 2, **bad}), _event(seq=3)])
    body = body.replace(str(_HUGE).encode(), b"1e400")
    parsed = parse_batch(body, NOW)
    assert [e.seq for e in parsed.events] == [1, 3], parsed.refused
    (refusal,) = parsed.refused
    assert refusal.index == 1 and why in refusal.reason, refusal.reason


def test_a_player_clock_running_ahead_is_moved_back_keeping_the_order() -> None:
    ahead = 3600.0
    events = [_event(seq=1, at=NOW + ahead - 2), _event(seq=2, at=NOW + ahead)]
    parsed = parse_batch(_body(events), NOW)
    assert parsed.refused == [] and parsed.skew_s == ahead
    assert [(e.seq, e.at) for e in parsed.events] == [(1, NOW - 2), (2, NOW)]
    (first, _) = to_events(WHO, parsed.events, NOW, parsed.skew_s).events
    assert first.skew_s == ahead
    # a little ahead (within the allowance) and far behind are taken as they are
    parsed = parse_batch(_body([_event(at=NOW + 60), _event(at=5.0)]), NOW)
    assert [e.at for e in parsed.events] == [NOW + 60, 5.0] and parsed.skew_s == 0.0


def test_an_event_that_is_not_an_object_is_refused_alone() -> None:
    parsed = parse_batch(_body([_event(), 42, "x", None, [1]]), NOW)
    assert len(parsed.events) == 1 and [r.index for r in parsed.refused] == [1, 2, 3, 4]


def test_nan_is_not_json_and_the_body_is_refused_whole() -> None:
    body = b'{"session_id": "s1", "events": [{"at": 1, "position_s": NaN}]}'
    with pytest.raises(BatchError) as err:
        parse_batch(body, NOW)
    assert err.value.status == 400 and err.value.code == "bad_json"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 400),
        (b"{", 400),
        (b"[]", 422),
        (b'{"events": []}', 422),  # no session
        (b'{"session_id": "", "events": []}', 422),
        (b'{"session_id": "s", "events": {}}', 422),
        (_body([_event()] * (MAX_EVENTS + 1)), 422),
        (b" " * (MAX_BODY_BYTES + 1), 413),
        # hostile JSON: none of it reaches an event, or the answer is a 500
        (b'{"session_id": "s", "events": [' + b"[" * 30_000 + b"]" * 30_000 + b"]}", 400),
        (b'{"session_id": "s", "x": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}", 400),
        (b'{"session_id": "s", "events": [{"at": 1, "position_s": Infinity}]}', 400),
        (b'{"session_id": "\\ud800", "events": []}', 400),  # a lone surrogate
        (b'{"session_id": "s", "events": [{"at": 1, "position_s": 1, "kind": "\\udfff"}]}', 400),
        (b'{"session_id": "s", "events": [' + b",".join([b"0"] * 30_000) + b"]}", 422),
    ],
)
def test_a_body_that_is_no_batch_is_refused_whole(body: bytes, status: int) -> None:
    with pytest.raises(BatchError) as err:
        parse_batch(body, NOW)
    assert err.value.status == status, str(err.value)


def test_duplicated_events_are_kept_and_carry_the_same_key() -> None:
    parsed = parse_batch(_body([_event(seq=5), _event(seq=5)]), NOW)
    batch = to_events(WHO, parsed.events, NOW)
    assert batch.events[0].key == batch.events[1].key == ("tv-1", "s1", 5, NOW - 1)


def test_the_record_round_trips_and_older_records_still_decode() -> None:
    parsed = parse_batch(_body([_event(seq=1, edge="e1", bitrate_kbps=800.0)]), NOW)
    batch = to_events(WHO, parsed.events, NOW)
    assert decode_record(encode_record(batch)) == batch
    # a record written before the optional fields existed
    old = msgspec.msgpack.encode(
        {
            "device": "d",
            "events": [
                {
                    "account": "a",
                    "session": "s",
                    "device": "d",
                    "title": "t",
                    "received_at": NOW,
                    "at": NOW,
                    "seq": 0,
                    "kind": "position",
                    "position_s": 1.0,
                }
            ],
        }
    )
    (e,) = decode_record(old).events
    assert e.edge is None and e.rebuffers == 0
    assert isinstance(decode_record(old), EventBatch)


@given(st.text(max_size=40), st.integers(min_value=1, max_value=64))
def test_a_device_always_lands_in_the_same_partition(device: str, partitions: int) -> None:
    p = partition_of(device, partitions)
    assert 0 <= p < partitions and p == partition_of(device, partitions)


def test_devices_spread_over_the_partitions() -> None:
    counts = [0] * 8
    for n in range(8000):
        counts[partition_of(f"device-{n}", 8)] += 1
    assert min(counts) > 800, counts


def test_every_field_a_player_sends_is_carried_by_the_stream() -> None:
    sent = set(PlayerEvent.__struct_fields__)
    assert sent <= set(HeartbeatEvent.__struct_fields__)


def test_nul_in_text_is_refused_in_words() -> None:
    parsed = parse_batch(_body([_event(kind="\x00")]), NOW)
    (refusal,) = parsed.refused
    assert "without NUL characters" in refusal.reason and "$.kind" in refusal.reason


@pytest.mark.parametrize("field", ["kind", "phase", "format", "rung_id", "edge"])
def test_nul_in_any_text_field_refuses_that_event_alone(field: str) -> None:
    parsed = parse_batch(_body([_event(), _event(**{field: "a\x00b"}), _event()]), NOW)
    assert len(parsed.events) == 2
    (refusal,) = parsed.refused
    assert refusal.index == 1 and f"$.{field}" in refusal.reason
    assert "without NUL characters" in refusal.reason


def test_nul_in_the_session_id_refuses_the_batch() -> None:
    with pytest.raises(BatchError) as err:
        parse_batch(_body([_event()], session_id="s\x00"), NOW)
    assert err.value.status == 422 and "$.session_id" in str(err.value)


_ANY_FIELD = st.dictionaries(
    st.sampled_from(["at", "position_s", "kind", "edge", "rung", "seq", "buffer_s", "other"]),
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(min_value=-(2**60), max_value=2**60),
        st.text(max_size=70),
        st.none(),
    ),
)


@given(st.lists(st.one_of(_ANY_FIELD, st.integers(), st.text(max_size=5)), max_size=12))
def test_a_batch_is_read_as_its_events_one_by_one_would_be(events: list[Any]) -> None:
    """Whatever the mix of good and bad events, a batch keeps exactly the events that are
    good on their own, in order, and refuses the others by index."""
    parsed = parse_batch(_body(events), NOW)
    kept: list[PlayerEvent] = []
    refused = []
    for index, event in enumerate(events):
        try:
            one = parse_batch(_body([event]), NOW)
        except BatchError:
            raise AssertionError("a batch of one event is never refused whole") from None
        if one.events:
            kept.extend(one.events)
        else:
            refused.append(index)
    skew = max((e.at for e in kept), default=NOW) - NOW
    assert [r.index for r in parsed.refused] == refused
    if skew <= 300:  # moved back as a batch otherwise (its own test)
        assert parsed.events == kept
    else:
        assert len(parsed.events) == len(kept)
