"""The headless viewers' live rules (pure), over playlists the channel's own writer makes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.live import Part, Segment, Window, media_playlist
from streamplane.live.playlist import part_name, segment_name
from streamplane.player import ManifestError
from streamplane.player.live import (
    MAX_RATE,
    MIN_RATE,
    AudioRendition,
    join_part,
    live_rung,
    next_number,
    parse_audio_rendition,
    parse_live_playlist,
    parse_variants,
    part_after,
    playback_rate,
)

T0 = 1_800_000_000.0


def window(segments: int, open_parts: int, first: int = 5, ended: bool = False) -> Window:
    """``segments`` whole segments of four half-second parts (the first independent), then
    an open one with ``open_parts`` parts, as the channel's packager keeps them."""
    out = []
    for k in range(segments + 1):
        msn = first + k
        count = 4 if k < segments else open_parts
        parts = tuple(Part(0.5, i == 0, part_name(msn, i)) for i in range(count))
        out.append(
            Segment(
                msn=msn,
                uri=segment_name(msn),
                parts=parts,
                map_uri="init_0.mp4",
                program_date_time=T0 + 2 * k,
                duration=2.0 if k < segments else None,
            )
        )
    return Window(tuple(out), part_target=0.5, segment_target=2.0, ended=ended)


def test_a_channels_playlist_reads_back_as_its_parts() -> None:
    playlist = parse_live_playlist(media_playlist(window(4, 2)))
    # parts are listed for the last three segments: msn 7, 8 (whole) and 9 (open, 2 parts)
    assert [p.number for p in playlist.parts] == [
        (7, 0), (7, 1), (7, 2), (7, 3), (8, 0), (8, 1), (8, 2), (8, 3), (9, 0), (9, 1)
    ]  # fmt: skip
    assert playlist.part_target == 0.5 and playlist.part_hold_back == 1.5
    assert playlist.preload == (9, 2)
    assert playlist.map_uri == "init_0.mp4" and not playlist.ended
    assert [p.independent for p in playlist.parts[:5]] == [True, False, False, False, True]
    assert playlist.parts[1].uri == "seg_7.1.m4s"
    # program dates: the segment's, plus the parts before in it (milliseconds in the text)
    assert playlist.parts[2].program_date == pytest.approx(T0 + 4 + 1.0, abs=1e-3)
    assert parse_live_playlist(media_playlist(window(1, 0, ended=True))).ended


def test_not_a_live_playlist_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(ManifestError, match="EXTM3U"):
        parse_live_playlist("<html>")
    with pytest.raises(ManifestError, match="low-latency"):
        parse_live_playlist("#EXTM3U\n#EXTINF:2,\nseg_1.m4s\n")
    with pytest.raises(ManifestError, match="malformed"):
        parse_live_playlist("#EXTM3U\n#EXT-X-PART-INF:PART-TARGET=x\n")
    with pytest.raises(ManifestError, match="no variant"):
        parse_variants("#EXTM3U\n")


def test_variants_lowest_first() -> None:
    text = (
        '#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=900000,CODECS="avc1.4d401e",RESOLUTION=640x360\n'
        "v360/index.m3u8?__token__=t\n"
        "#EXT-X-STREAM-INF:BANDWIDTH=500000,RESOLUTION=426x240\nv240/index.m3u8\n"
    )
    variants = parse_variants(text)
    assert [(v.uri, v.bandwidth, v.height) for v in variants] == [
        ("v240/index.m3u8", 500000, 240),
        ("v360/index.m3u8?__token__=t", 900000, 360),
    ]


def _master(*media: str, audio_group: str | None = "aud") -> str:
    named = f',AUDIO="{audio_group}"' if audio_group else ""
    return (
        "#EXTM3U\n"
        + "".join(f"#EXT-X-MEDIA:{m}\n" for m in media)
        + f"#EXT-X-STREAM-INF:BANDWIDTH=900000,RESOLUTION=640x360{named}\nv360/index.m3u8\n"
        + f"#EXT-X-STREAM-INF:BANDWIDTH=500000,RESOLUTION=426x240{named}\nv240/index.m3u8\n"
    )


def test_the_audio_rendition_is_the_default_of_the_group_the_variant_names() -> None:
    text = _master(
        'TYPE=AUDIO,GROUP-ID="other",NAME="x",DEFAULT=YES,URI="x/index.m3u8"',
        'TYPE=AUDIO,GROUP-ID="aud",NAME="dub",URI="dub/index.m3u8"',
        'TYPE=AUDIO,GROUP-ID="aud",NAME="main",DEFAULT=YES,URI="audio/index.m3u8?__token__=t"',
        'TYPE=SUBTITLES,GROUP-ID="aud",NAME="subs",DEFAULT=YES,URI="subs/index.m3u8"',
    )
    assert parse_audio_rendition(text) == AudioRendition(
        "audio/index.m3u8?__token__=t", "aud", "main"
    )
    # no DEFAULT=YES: the first of the group
    first = _master('TYPE=AUDIO,GROUP-ID="aud",NAME="dub",URI="dub/index.m3u8"')
    assert parse_audio_rendition(first) == AudioRendition("dub/index.m3u8", "aud", "dub")


def test_no_audio_rendition_to_fetch_is_none() -> None:
    # a channel without audio
    assert parse_audio_rendition(_master(audio_group=None)) is None
    # the group's audio is in the variant's own stream (no URI)
    muxed = _master('TYPE=AUDIO,GROUP-ID="aud",NAME="main",DEFAULT=YES')
    assert parse_audio_rendition(muxed) is None


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("v240/index.m3u8\n", "no #EXTM3U"),
        (_master('TYPE=AUDIO,NAME="main",URI="a.m3u8"'), "lacks GROUP-ID or NAME"),
        (_master('TYPE=AUDIO,GROUP-ID="aud",URI="a.m3u8"'), "lacks GROUP-ID or NAME"),
        (_master('TYPE=AUDIO,GROUP-ID="en",NAME="main",URI="a.m3u8"'), "'aud', never defined"),
        (_master(), "'aud', never defined"),
        ('#EXTM3U\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="m",URI="a"\n', "no variant"),
    ],
)
def test_a_malformed_audio_rendition_is_refused_with_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(ManifestError, match=said):
        parse_audio_rendition(text)


@given(segments=st.integers(1, 6), open_parts=st.integers(0, 3))
def test_the_join_is_the_newest_independent_part_at_least_the_hold_back_behind(
    segments: int, open_parts: int
) -> None:
    playlist = parse_live_playlist(media_playlist(window(segments, open_parts)))
    part = join_part(playlist)
    assert part is not None and part.independent
    k = playlist.parts.index(part)
    behind = sum(p.duration for p in playlist.parts[k:])
    later = [p for p in playlist.parts[k + 1 :] if p.independent]
    if behind >= playlist.part_hold_back:
        # no later independent part is as far behind: it is the newest that is
        for p in later:
            j = playlist.parts.index(p)
            assert sum(q.duration for q in playlist.parts[j:]) < playlist.part_hold_back
    else:  # nothing listed is that far behind: the oldest independent part
        assert k == min(i for i, p in enumerate(playlist.parts) if p.independent)


def test_the_next_part_comes_from_the_playlist_or_a_blocking_reload() -> None:
    playlist = parse_live_playlist(media_playlist(window(3, 1)))
    after = part_after(playlist, (7, 3))
    assert after is not None and after.number == (8, 0)
    assert part_after(playlist, (8, 0)) is None  # the newest: reload for the next
    assert next_number((8, 0)) == (8, 1)
    assert part_after(playlist, (2, 0)) is None  # no longer listed: behind the parts


@given(
    latency=st.floats(0, 30),
    target=st.floats(0.5, 6),
    buffer=st.floats(0, 10),
)
def test_the_rate_moves_the_latency_towards_the_target_within_bounds(
    latency: float, target: float, buffer: float
) -> None:
    rate = playback_rate(latency, target, buffer, 0.5)
    assert MIN_RATE <= rate <= MAX_RATE
    if latency > target + 0.05 and buffer > 0.5:
        assert rate > 1.0
    if latency < target - 0.05:
        assert rate < 1.0
    if buffer <= 0.5:  # never catch up on the last part buffered: that would stall
        assert rate <= 1.0


def test_a_slow_part_steps_down_at_once_and_fast_ones_step_up_slowly() -> None:
    bw = [300_000, 800_000, 2_000_000]
    # the last part of rung 2 took longer than it plays: down one, before the buffer is out
    assert live_rung(2, bw, [(0.2, 0.5, 2), (0.7, 0.5, 2)], buffer_s=1.2, part_s=0.5) == 1
    # a buffer under one part on rung 1: down
    assert live_rung(1, bw, [(0.3, 0.5, 1)], buffer_s=0.4, part_s=0.5) == 0
    assert live_rung(0, bw, [(2.0, 0.5, 0)], buffer_s=0.1, part_s=0.5) == 0  # the floor
    fast = [(0.01, 0.5, 0)] * 4
    assert live_rung(0, bw, fast[:3], buffer_s=1.5, part_s=0.5) == 0  # not yet
    assert live_rung(0, bw, fast, buffer_s=1.5, part_s=0.5) == 1
    # fast, but the measured rate does not cover the next rung with room: stay
    assert live_rung(0, bw, [(0.2, 0.5, 0)] * 4, buffer_s=1.5, part_s=0.5) == 0
    assert live_rung(2, bw, [(0.01, 0.5, 2)] * 8, buffer_s=1.5, part_s=0.5) == 2  # the top
