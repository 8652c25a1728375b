"""What warming asks an edge for: the playlists, init segments and the parts a viewer joining
now would fetch, read from the playlists the channel writes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.live import Fragment, Rendition, TrackPackager, master_playlist, media_playlist
from streamplane.live.warm import EdgeWarmth, master_targets, media_targets
from streamplane.player import ManifestError
from streamplane.player.live import join_part, parse_live_playlist


def test_the_master_gives_every_media_playlist_video_and_audio() -> None:
    text = master_playlist(
        [
            Rendition("audio/index.m3u8", "mp4a.40.2", 64_000, audio=True),
            Rendition("v144/index.m3u8", "avc1.42c00c", 150_000, 256, 144),
            Rendition("v240/index.m3u8", "avc1.42c015", 400_000, 426, 240),
        ]
    )
    assert master_targets(text) == ["v144/index.m3u8", "v240/index.m3u8", "audio/index.m3u8"]
    with pytest.raises(ManifestError):
        master_targets("<html>not found</html>")


@given(parts=st.integers(1, 40))
def test_a_media_playlist_gives_its_init_and_the_parts_from_where_a_viewer_joins(
    parts: int,
) -> None:
    track = TrackPackager(0.5, 2.0, 3600.0)
    track.begin(b"init")
    for i in range(parts):
        track.push(Fragment(i * 0.5, 0.5, i % 4 == 0, b"x"), 1_800_000_000.0 + i * 0.5)
    text = media_playlist(track.window())
    playlist = parse_live_playlist(text)
    targets = media_targets(text)
    assert targets[0] == playlist.map_uri
    joined = join_part(playlist)
    assert joined is not None  # the first part is a keyframe
    # every part from the one a viewer joins at to the newest, nothing older, nothing twice
    newest = playlist.parts[-1]
    assert targets[1] == joined.uri and targets[-1] == newest.uri
    assert (
        len(targets[1:])
        == len(set(targets[1:]))
        == playlist.parts.index(newest) - (playlist.parts.index(joined)) + 1
    )


def test_an_edge_is_warm_when_its_round_fetched_everything() -> None:
    assert EdgeWarmth("e1", 1.0, 5, ()).warm
    cold = EdgeWarmth("e1", 1.0, 2, ("/ch/v/init.mp4: 502",))
    assert not cold.warm and "init.mp4: 502" in cold.why
    assert not EdgeWarmth("e1", 1.0, 0, ()).warm
