"""The LL-HLS playlist core, driven by the track packager over generated fragment streams and
read back with the m3u8 library (a parser written by others, not by us)."""

from __future__ import annotations

import math

import m3u8
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamplane.live import (
    BadReload,
    Fragment,
    Rendition,
    TrackPackager,
    master_playlist,
    media_playlist,
    reload_ready,
)
from streamplane.live.track import RemoveObject, WriteObject

PART = 0.5
SEGMENT = 2.0


def _video(n: int, start: float = 10.0) -> list[Fragment]:
    """n fragments of one part each, a keyframe every segment target."""
    per_segment = round(SEGMENT / PART)
    return [Fragment(start + i * PART, PART, i % per_segment == 0, b"frag%d" % i) for i in range(n)]


# A run of fragments: how many, and whether the encoder restarted before it.
runs = st.lists(st.tuples(st.integers(1, 14), st.booleans()), min_size=1, max_size=5)


def _play(track: TrackPackager, plan: list[tuple[int, bool]]) -> list[WriteObject | RemoveObject]:
    effects: list[WriteObject | RemoveObject] = []
    wall = 1_800_000_000.0
    for i, (count, interrupted) in enumerate(plan):
        if i == 0 or interrupted:
            effects += track.interrupt()
            effects += track.begin(b"init%d" % i)
        for fragment in _video(count, start=100.0 * i):
            wall += PART
            effects += track.push(fragment, wall)
    return effects


@settings(max_examples=150, deadline=None)
@given(plan=runs, dvr=st.sampled_from([4.0, 6.0, 3600.0]))
def test_the_playlist_parses_back_to_the_window(plan: list[tuple[int, bool]], dvr: float) -> None:
    track = TrackPackager(PART, SEGMENT, dvr)
    effects = _play(track, plan)
    window = track.window()
    text = media_playlist(window)
    parsed = m3u8.loads(text)

    complete = [s for s in window.segments if s.duration is not None]
    assert parsed.media_sequence == window.first_msn
    # the m3u8 library puts the open segment's parts in a segment without a URI
    whole = [s for s in parsed.segments if s.uri is not None]
    assert [s.uri for s in whole] == [s.uri for s in complete]
    for got, want in zip(whole, complete, strict=True):
        assert got.duration == pytest.approx(want.duration, abs=1e-4)
        assert round(got.duration) <= parsed.target_duration
    assert parsed.server_control.can_block_reload == "YES"
    assert parsed.server_control.part_hold_back >= 2 * parsed.part_inf.part_target
    assert parsed.part_inf.part_target == pytest.approx(PART)
    assert not parsed.is_endlist
    # the preload hint names the part that comes next, which no part line names yet
    msn, index = window.next_part()
    assert parsed.preload_hint.uri == f"seg_{msn}.{index}.m4s"
    listed: set[str] = set()
    for seg in parsed.segments:
        listed |= {p.uri for p in seg.parts}
    assert parsed.preload_hint.uri not in listed
    # every part of the newest segments is listed, each within the part target
    newest = window.segments[-1]
    assert {p.uri for p in newest.parts} <= listed
    assert all(p.duration <= PART + 1e-9 for s in window.segments for p in s.parts)
    # the DVR window: what is listed covers at least the window (or everything there was),
    # and every file it names was written and not removed since
    written = set()
    for effect in effects:
        if isinstance(effect, WriteObject):
            written.add(effect.name)
        else:
            written.discard(effect.name)
    assert {s.uri for s in complete} | listed | {s.map_uri for s in window.segments} <= written
    total = sum(s.duration or 0 for s in complete)
    assert total >= min(dvr, sum(c for c, _ in plan) * PART - 2 * SEGMENT) - 1e-9
    # discontinuities: one per restart still in the window, counted once it leaves
    restarts = sum(1 for i, (_, again) in enumerate(plan) if i and again)
    tags = text.count("#EXT-X-DISCONTINUITY\n")
    assert window.discontinuity_sequence + tags == restarts


def test_a_segment_is_its_parts_end_to_end() -> None:
    track = TrackPackager(PART, SEGMENT, 3600)
    effects = track.begin(b"init")
    for fragment in _video(5):
        effects += track.push(fragment, 1e9)
    data = {e.name: e.data for e in effects if isinstance(e, WriteObject)}
    assert data["seg_0.m4s"] == b"".join(data[f"seg_0.{i}.m4s"] for i in range(4))
    assert "seg_1.m4s" not in data  # still open: one part so far


def test_old_segments_expire_with_their_parts_and_init() -> None:
    track = TrackPackager(PART, SEGMENT, 4.0)
    effects = track.begin(b"i0")
    for fragment in _video(8):
        effects += track.push(fragment, 1e9)
    effects += track.begin(b"i1")  # the feed came back: the last segment closes
    for fragment in _video(12, start=500):
        effects += track.push(fragment, 1e9)
    removed = {e.name for e in effects if isinstance(e, RemoveObject)}
    assert {"seg_0.m4s", "seg_0.0.m4s", "seg_0.3.m4s", "seg_1.m4s", "init_0.mp4"} <= removed
    window = track.window()
    assert window.first_msn == 2
    assert window.discontinuity_sequence == 1  # the restart's tag left with segment 1


def test_a_restart_is_a_discontinuity_with_its_own_init() -> None:
    track = TrackPackager(PART, SEGMENT, 3600)
    track.begin(b"a")
    for fragment in _video(6):
        track.push(fragment, 1e9)
    track.interrupt()
    track.begin(b"b")
    for fragment in _video(5, start=0):
        track.push(fragment, 1e9)
    parsed = m3u8.loads(media_playlist(track.window()))
    assert [s.uri for s in parsed.segments][:3] == ["seg_0.m4s", "seg_1.m4s", "seg_2.m4s"]
    assert [s.discontinuity for s in parsed.segments][:3] == [False, False, True]
    assert parsed.segments[2].init_section.uri == "init_1.mp4"
    assert parsed.segments[1].duration == pytest.approx(1.0)  # closed early when the feed went


def test_an_ended_channel_ends_its_playlist() -> None:
    track = TrackPackager(PART, SEGMENT, 3600)
    track.begin(b"a")
    for fragment in _video(3):
        track.push(fragment, 1e9)
    track.end()
    parsed = m3u8.loads(media_playlist(track.window()))
    assert parsed.is_endlist and parsed.preload_hint is None
    assert reload_ready(track.window(), 99, 0)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 30),
    msn=st.integers(0, 12),
    part=st.one_of(st.none(), st.integers(0, 5)),
)
def test_blocking_reload_is_ready_exactly_when_the_part_is_listed(
    count: int, msn: int, part: int | None
) -> None:
    track = TrackPackager(PART, SEGMENT, 3600)
    track.begin(b"a")
    for fragment in _video(count):
        track.push(fragment, 1e9)
    window = track.window()
    newest_complete = max((s.msn for s in window.segments if s.duration is not None), default=-1)
    if msn > newest_complete + 2:
        with pytest.raises(BadReload):
            reload_ready(window, msn, part)
        return
    ready = reload_ready(window, msn, part)
    text = media_playlist(window)
    if part is None:
        assert ready == (f"seg_{msn}.m4s\n" in text or msn < window.first_msn)
    else:
        listed = [
            tuple(int(x) for x in line.split('URI="seg_')[1].split(".m4s")[0].split("."))
            for line in text.splitlines()
            if line.startswith("#EXT-X-PART:")
        ]
        later = any(position >= (msn, part) for position in listed)
        assert ready == later
    # and once ready, it stays ready as the channel goes on
    if ready:
        for fragment in _video(4, start=10 + count * PART):
            track.push(fragment, 1e9)
        assert reload_ready(track.window(), msn, part)


def test_a_reload_with_nonsense_is_refused() -> None:
    track = TrackPackager(PART, SEGMENT, 3600)
    track.begin(b"a")
    with pytest.raises(BadReload):
        reload_ready(track.window(), -1, None)
    with pytest.raises(BadReload):
        reload_ready(track.window(), 0, -2)


def test_master_playlist_lists_rungs_with_the_audio_group() -> None:
    text = master_playlist(
        [
            Rendition("audio/index.m3u8", "mp4a.40.2", 64_000, audio=True),
            Rendition("v144/index.m3u8", "avc1.42c00c", 150_000, 256, 144),
            Rendition("v240/index.m3u8", "avc1.42c015", 400_000, 426, 240),
        ]
    )
    parsed = m3u8.loads(text)
    assert [p.uri for p in parsed.playlists] == ["v240/index.m3u8", "v144/index.m3u8"]
    assert parsed.playlists[0].stream_info.bandwidth == 464_000
    assert parsed.playlists[0].stream_info.codecs == "avc1.42c015,mp4a.40.2"
    assert parsed.media[0].uri == "audio/index.m3u8" and parsed.media[0].group_id == "aud"
    with pytest.raises(ValueError):
        master_playlist([Rendition("audio/index.m3u8", "mp4a.40.2", 1, audio=True)])


def test_track_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        TrackPackager(3.0, 2.0, 100)
    with pytest.raises(ValueError):
        TrackPackager(0.5, 2.0, 1.0)
    assert math.isfinite(PART)
