"""The realtime core, pure: frames, codes, ordering and recovery, limits, presence, counts."""

from __future__ import annotations

import itertools
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.realtime.broker import Position, PresenceEntry, StateValue
from streamplane.realtime.history import missed_range
from streamplane.realtime.protocol import (
    DEFAULT_NAMESPACES,
    Code,
    CountThrottle,
    Cursor,
    Delete,
    FrameError,
    Mutes,
    Ping,
    Publish,
    SetState,
    Subscribe,
    TokenBucket,
    Verdict,
    decode_client_frame,
    decode_server_frame,
    disconnect_frame,
    encode,
    is_stale,
    namespace_of,
    presence_counted,
    presence_update,
    required_right,
)


def test_a_batched_subscribe_decodes_with_each_channels_last_position() -> None:
    frame = decode_client_frame(
        b'{"type":"subscribe","id":7,"channels":[{"channel":"chat:final",'
        b'"since":{"epoch":"e1","offset":41}},{"channel":"state:final"}]}',
        max_bytes=4096,
    )
    assert isinstance(frame, Subscribe) and frame.id == 7
    assert [(c.channel, c.since) for c in frame.channels] == [
        ("chat:final", Position("e1", 41)),
        ("state:final", None),
    ]


def test_publish_carries_its_data_verbatim() -> None:
    frame = decode_client_frame(
        b'{"type":"publish","id":1,"channel":"chat:a","data":{"text":"goal!"}}', max_bytes=4096
    )
    assert isinstance(frame, Publish) and bytes(frame.data) == b'{"text":"goal!"}'


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"type":"launch","id":1}',
        b'{"type":"publish","id":1,"channel":"chat:a"}',  # no data
        b'{"type":"ping","id":"one"}',
        b'{"type":"ping","id":1,"extra":true}',
        b'{"id":1}',
        b"\xff\xfe",
    ],
)
def test_anything_but_a_known_frame_is_a_bad_frame(data: bytes) -> None:
    with pytest.raises(FrameError) as err:
        decode_client_frame(data, max_bytes=4096)
    assert err.value.code is Code.BAD_FRAME


def test_an_oversized_frame_is_refused_before_it_is_parsed() -> None:
    big = b'{"type":"ping","id":1}' + b" " * 5000
    with pytest.raises(FrameError) as err:
        decode_client_frame(big, max_bytes=4096)
    assert err.value.code is Code.TOO_LARGE
    assert isinstance(decode_client_frame(big[:4096], max_bytes=4096), Ping)


def test_closing_codes_tell_the_client_whether_and_when_to_reconnect() -> None:
    slow = disconnect_frame(Code.SLOW)
    assert slow.reconnect and slow.after_ms > 0 and slow.code == 4010
    assert not disconnect_frame(Code.UNAUTHORIZED).reconnect, "a forged token will not improve"
    assert disconnect_frame(Code.TOKEN_EXPIRED).reconnect
    assert not disconnect_frame(Code.BAD_FRAME).reconnect
    assert disconnect_frame(Code.SHUTDOWN).reconnect
    assert all(4000 <= c <= 4999 for c in Code), "close codes kept for applications"
    decoded = decode_server_frame(encode(slow))
    assert decoded == slow


def test_channel_names_and_namespaces() -> None:
    assert namespace_of("chat:final", DEFAULT_NAMESPACES).name == "chat"
    assert namespace_of("state:final", DEFAULT_NAMESPACES).kind == "state"
    for bad in ["final", "chat:", "nope:final", "chat:a b", "chat:" + "x" * 200, "chat:é"]:
        with pytest.raises(FrameError) as err:
            namespace_of(bad, DEFAULT_NAMESPACES)
        assert err.value.code is Code.UNKNOWN_CHANNEL


def test_rights_each_frame_needs_and_no_chat_into_a_state_channel() -> None:
    chat, state = DEFAULT_NAMESPACES["chat"], DEFAULT_NAMESPACES["state"]
    publish = Publish(id=1, channel="state:final", data=msgspec.Raw(b"{}"))
    write = SetState(
        id=2,
        channel="state:final",
        key="k",
        value=msgspec.Raw(b"1"),
        seq=1,
        source_time_ms=0,
        max_age_ms=1,
    )
    assert required_right(publish, chat) == "publish"
    assert required_right(write, state) == "publish"
    assert required_right(Delete(id=3, channel="chat:a", offset=1), chat) == "moderate"
    assert required_right(Ping(id=1), chat) == "read"
    for frame, namespace in [(publish, state), (write, chat)]:
        with pytest.raises(FrameError) as err:
            required_right(frame, namespace)
        assert err.value.code is Code.FORBIDDEN


# -- ordering and recovery ------------------------------------------------------------------


def test_the_cursor_applies_the_next_publication_only() -> None:
    cursor = Cursor()
    assert cursor.offer("chat:a", "e1", 1) is Verdict.GAP, "no position yet: subscribe first"
    cursor.reset("chat:a", Position("e1", 3))
    assert cursor.offer("chat:a", "e1", 3) is Verdict.DUPLICATE
    assert cursor.offer("chat:a", "e1", 5) is Verdict.GAP
    assert cursor.offer("chat:a", "e1", 4) is Verdict.APPLY
    assert cursor.offer("chat:a", "e1", 4) is Verdict.DUPLICATE
    assert cursor.offer("chat:a", "e2", 5) is Verdict.GAP, "a new epoch is a reload"
    assert cursor.position("chat:a") == Position("e1", 4)


@given(
    top=st.integers(0, 50),
    since=st.integers(-2, 60),
    oldest_back=st.integers(0, 60),
    limit=st.integers(0, 60),
    same_epoch=st.booleans(),
)
def test_recovery_is_exactly_the_missed_offsets_or_nothing(
    top: int, since: int, oldest_back: int, limit: int, same_epoch: bool
) -> None:
    oldest = max(1, top + 1 - oldest_back)  # kept: oldest..top
    answer = missed_range(
        Position("e1" if same_epoch else "e0", since), Position("e1", top), oldest, limit
    )
    recoverable = same_epoch and 0 <= since <= top and since + 1 >= oldest and top - since <= limit
    if recoverable:
        assert answer == range(since + 1, top + 1)
    else:
        assert answer is None


@settings(max_examples=300)
@given(
    total=st.integers(1, 40),
    deliveries=st.lists(st.integers(1, 40), max_size=80),
    keep=st.integers(0, 40),
    epoch_change_at=st.none() | st.integers(0, 79),
)
def test_a_client_never_applies_a_publication_twice_or_out_of_order(
    total: int, deliveries: list[int], keep: int, epoch_change_at: int | None
) -> None:
    """Whatever arrives (duplicates, reordering, losses, an epoch change), what the client
    applies is, per epoch, a run of consecutive offsets each applied once; a gap is either
    filled exactly from history or turned into a reload."""
    epoch = "e1"
    cursor = Cursor()
    cursor.reset("c", Position(epoch, 0))
    applied: list[tuple[str, int]] = []
    published = total
    for i, offset in enumerate(deliveries):
        if epoch_change_at == i:
            epoch, published = "e2", total  # the broker lost its stream and started again
        offset = min(offset, published)
        verdict = cursor.offer("c", epoch, offset)
        if verdict is Verdict.APPLY:
            applied.append((epoch, offset))
        elif verdict is Verdict.GAP:
            at = cursor.position("c")
            assert at is not None
            oldest = max(1, published + 1 - keep)
            wanted = missed_range(at, Position(epoch, published), oldest, limit=100)
            if wanted is None:
                cursor.reset("c", Position(epoch, published))
                applied.append((epoch, -1))  # a reload marker
            else:
                for missed in wanted:
                    assert cursor.offer("c", epoch, missed) is Verdict.APPLY
                    applied.append((epoch, missed))
    previous: tuple[str, int] | None = ("e1", 0)
    for entry in applied:
        if entry[1] == -1:
            previous = None
            continue
        if previous is not None and previous[0] == entry[0]:
            assert entry[1] == previous[1] + 1
        previous = entry
    real = [e for e in applied if e[1] != -1]
    assert len(real) == len(set(real)), "nothing applied twice"


def test_a_value_past_its_max_age_is_stale() -> None:
    value = StateValue(key="k", value=b"1", seq=1, source_time_ms=10_000, max_age_ms=2_000)
    assert not is_stale(value, 12_000)
    assert is_stale(value, 12_001)


# -- limits, moderation, presence, counts ---------------------------------------------------


def test_the_token_bucket_allows_a_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s() == pytest.approx(0.5)
    assert not bucket.take(100.4)
    assert bucket.take(100.5)
    assert bucket.take(200.0) and bucket.take(200.0) and bucket.take(200.0)
    assert not bucket.take(200.0), "refilled to the burst, no further"


@given(
    rate=st.floats(0.1, 50),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=100),
)
def test_the_token_bucket_never_grants_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now, granted = 0.0, 0
    for gap in gaps:
        now += gap
        granted += bucket.take(now)
    assert granted <= burst + rate * now + 1e-6


def test_a_mute_lasts_until_its_end() -> None:
    mutes = Mutes()
    mutes.mute("chat:a", "troll", until=160.0)
    mutes.mute("chat:a", "troll", until=100.0)  # a shorter mute never shortens a longer one
    assert mutes.is_muted("chat:a", "troll", 159.0)
    assert not mutes.is_muted("chat:b", "troll", 159.0)
    assert not mutes.is_muted("chat:a", "troll", 160.0)


def test_presence_diffs_for_a_small_channel_and_none_for_a_large_one() -> None:
    before = {"c1": "ann", "c2": "bob"}
    after = [PresenceEntry(client="c2", user="bob"), PresenceEntry(client="c3", user="cy")]
    diff = presence_update("chat:a", before, after, diff_limit=10)
    assert diff is not None
    assert [(u.client, u.user) for u in diff.joined] == [("c3", "cy")] and diff.left == ["c1"]
    assert presence_update("chat:a", before, after, diff_limit=1) is None
    same = [PresenceEntry(client=c, user=u) for c, u in before.items()]
    assert presence_update("chat:a", before, same, diff_limit=10) is None


def test_a_channel_is_counted_past_the_diff_limit_and_listed_again_only_at_half_of_it() -> None:
    assert not presence_counted(100, 3, False, diff_limit=100)
    assert presence_counted(101, 3, False, diff_limit=100)
    assert presence_counted(0, 101, False, diff_limit=100), "this process alone is large"
    assert presence_counted(60, 3, True, diff_limit=100), "near the limit it stays counted"
    assert not presence_counted(50, 3, True, diff_limit=100)
    # A storm empties a large channel for a moment: it stays counted until it has stayed small.
    assert presence_counted(4, 1, True, diff_limit=100, small_for=5.0, settle=30.0)
    assert not presence_counted(4, 1, True, diff_limit=100, small_for=30.0, settle=30.0)


@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=50),
    limit=st.integers(1, 200),
    settle=st.integers(0, 5),
)
def test_a_channel_moves_between_counted_and_listed_only_across_the_band(
    sizes: list[int], limit: int, settle: int
) -> None:
    """Whatever the sizes (one a second), a move to counts happens only past the limit and
    back to entries only once the channel has stayed at half of it or below ``settle`` seconds:
    a channel hovering at the limit never flaps, a storm's moment of emptiness moves nothing."""
    counted, small_since = False, -1
    for t, size in enumerate(sizes):
        if size > limit // 2:
            small_since = -1
        elif small_since < 0:
            small_since = t
        small_for = 0 if small_since < 0 else t - small_since
        now = presence_counted(
            size, 0, counted, diff_limit=limit, small_for=small_for, settle=settle
        )
        if now and not counted:
            assert size > limit
        if counted and not now:
            assert size <= limit // 2 and small_for >= settle
        counted = now


@given(events=st.lists(st.tuples(st.floats(0, 0.7), st.integers(0, 3)), max_size=60))
def test_count_updates_at_most_once_a_second_per_channel_and_only_on_change(
    events: list[tuple[float, int]],
) -> None:
    throttle = CountThrottle(interval=1.0)
    now, sent = 0.0, []
    for gap, viewers in events:
        now += gap
        if throttle.due("event:a", viewers, now):
            sent.append((now, viewers))
    for (t0, v0), (t1, v1) in itertools.pairwise(sent):
        assert t1 - t0 >= 1.0 and v1 != v0


def test_frames_are_plain_json() -> None:
    assert json.loads(encode(Ping(id=3))) == {"type": "ping", "id": 3}
