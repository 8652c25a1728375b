"""A channel's program recorded as a VOD source and re-encoded per shot by the media plane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from streamplane.live import Fragment, TrackPackager, media_playlist
from streamplane.live.record import recorded_runs
from streamplane.media import EncodeSettings, encode
from tests.live.conftest import wait_for

pytestmark = pytest.mark.timeout(180)


def test_the_runs_of_a_playlist_are_its_init_segments_and_whole_segments() -> None:
    track = TrackPackager(0.5, 2.0, 3600)
    track.begin(b"feed")
    for i in range(9):  # two whole segments and an open one
        track.push(Fragment(i * 0.5, 0.5, i % 4 == 0, b"x"), 1000.0 + i)
    track.interrupt()  # the feed is lost: its open segment closes with the part it has
    track.begin(b"slate")
    for i in range(6):
        track.push(Fragment(i * 0.5, 0.5, i % 4 == 0, b"x"), 2000.0 + i)
    runs = recorded_runs(media_playlist(track.window()))
    assert [(r.init, r.segments) for r in runs] == [
        ("init_0.mp4", ("seg_0.m4s", "seg_1.m4s", "seg_2.m4s")),
        ("init_1.mp4", ("seg_3.m4s",)),  # the slate's open segment is not recorded yet
    ]
    assert runs[0].seconds == pytest.approx(4.5)


def _stop(channel_name: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamplane", "live", "stop", channel_name, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=150,
    )


def test_a_stopped_channel_records_itself_and_the_recording_encodes_as_a_title(
    start_channel, tmp_path: Path
) -> None:
    recordings = tmp_path / "recordings"
    channel = start_channel("ch1", "--rungs", "144:150", "--record-to", str(recordings))
    feed = channel.feed(4)
    assert feed.wait(40) == 0
    # the slate follows the lost feed: the program has two runs, joined in the recording
    playlist = channel.root / "ch1" / "v144" / "index.m3u8"
    wait_for(lambda: len(recorded_runs(playlist.read_text())) > 1, 20, "a whole slate segment")

    done = _stop("ch1", channel.root)
    assert done.returncode == 0, done.stderr + done.stdout
    assert channel.process.wait(5) == 0
    assert "2 run(s)" in done.stdout
    [out] = recordings.glob("ch1-*.mp4")
    assert str(out) in done.stdout.replace("\n", "")
    status = json.loads((channel.root / "ch1" / "status.json").read_text())
    assert status["state"] == "stopped"
    assert status["recording"]["state"] == "written" and status["recording"]["runs"] == 2
    assert not (channel.root / "ch1" / "channel.pid").exists()
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.height == 144
        assert container.streams.audio
        seconds = float(container.duration or 0) / av.time_base
    assert seconds >= 4.0

    settings = EncodeSettings(
        heights=(144,),
        quantisers=(30, 40),
        rungs=1,
        preset="ultrafast",
        probe_preset="ultrafast",
        probe_vmaf_subsample=4,
        baseline=False,
        segment_target_s=2.0,
        segment_min_s=1.0,
        segment_max_s=4.0,
        workers=1,
    )
    title = tmp_path / "catalog" / "ch1-vod"
    encode(out, title, settings)
    assert (title / "title.json").is_file()
    assert (title / "master.m3u8").is_file()


def test_recording_a_channel_with_nothing_whole_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamplane", "live", "record", "nope"]
        + ["--root", str(tmp_path), "--out", str(tmp_path / "x.mp4")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "no channel" in done.stdout + done.stderr


def test_stopping_a_channel_that_holds_nothing_to_record_says_why(
    start_channel, tmp_path: Path
) -> None:
    channel = start_channel("ch1", "--rungs", "144:150", "--record-to", str(tmp_path / "rec"))
    done = _stop("ch1", channel.root)
    assert done.returncode == 1
    assert "could not be recorded" in done.stdout + done.stderr
    assert "no whole segment" in done.stdout + done.stderr
    assert channel.process.wait(5) == 0
    status = json.loads((channel.root / "ch1" / "status.json").read_text())
    assert status["recording"]["state"] == "failed"
    again = _stop("ch1", channel.root)  # it is gone: nothing to stop
    assert again.returncode == 2 and "not running" in again.stdout + again.stderr
