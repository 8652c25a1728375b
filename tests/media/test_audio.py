"""The packaged audio track against the video, read from the real files.

AAC-LC encoders put 1024 samples of priming before the first real sample. The package must skip
them with the init segment's edit list, so the audio presents from 0 and exactly as long as the
video and the manifests say, and its segments must start with the video's. The timing here is
read with a box reader of the test's own (not the packager's), the sound by decoding through
ffmpeg, and what a browser makes of it by appending the segments into Chromium's MSE.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import m3u8
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpegdash.parser import MPEGDASHParser

from streamplane.media.errors import PackagingError
from streamplane.media.package import audio_cuts
from streamplane.media.title import Title

AAC_FRAME = 1024  # samples per AAC-LC frame
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------------------------------------
# A box reader of the test's own: composition times of every sample, and the edit list.


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[str, int, int]]:
    """(type, payload start, end) of the boxes side by side in data[start:end]."""
    end = len(data) if end is None else end
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, start + 8)
            header = 16
        elif size == 0:
            size = end - start
        yield kind.decode("latin-1"), start + header, start + size
        start += size


def _find(data: bytes, path: str, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(payload start, end) of the first box at `path` ("moov/trak/mdia/mdhd")."""
    head, _, rest = path.partition("/")
    for kind, payload, stop in _boxes(data, start, end):
        if kind == head:
            return _find(data, rest, payload, stop) if rest else (payload, stop)
    raise KeyError(path)


@dataclass(frozen=True)
class Track:
    timescale: int
    media_time: int  # of the edit list; 0 without one
    # per segment: the earliest composition time and the end of the latest, before the edit
    segments: tuple[tuple[int, int], ...]

    def presented(self, k: int) -> tuple[Fraction, Fraction]:
        """Segment k's presentation interval, seconds (the edit starts presentation at 0)."""
        first, last = self.segments[k]
        start = max(first - self.media_time, 0)
        return Fraction(start, self.timescale), Fraction(last - self.media_time, self.timescale)

    @property
    def span(self) -> tuple[Fraction, Fraction]:
        return self.presented(0)[0], self.presented(len(self.segments) - 1)[1]


def read_track(directory: Path) -> Track:
    init = (directory / "init.mp4").read_bytes()
    at, _ = _find(init, "moov/trak/mdia/mdhd")
    version = init[at]
    (timescale,) = struct.unpack_from(">I", init, at + (20 if version == 1 else 12))
    media_time = 0
    try:
        at, _ = _find(init, "moov/trak/edts/elst")
    except KeyError:
        pass
    else:
        (count,) = struct.unpack_from(">I", init, at + 4)
        assert count == 1, f"{count} edits"
        # entry: segment_duration then media_time, 32 or 64 bits each by the box version
        if init[at] == 1:
            (media_time,) = struct.unpack_from(">q", init, at + 16)
        else:
            (media_time,) = struct.unpack_from(">i", init, at + 12)
    at, _ = _find(init, "moov/mvex/trex")
    (trex_duration,) = struct.unpack_from(">I", init, at + 12)

    names = sorted(directory.glob("seg_*.m4s"), key=lambda p: int(p.stem.split("_")[1]))
    segments = []
    for path in names:
        data = path.read_bytes()
        times: list[tuple[int, int]] = []
        for kind, payload, stop in _boxes(data):
            if kind != "moof":
                continue
            traf = _find(data, "traf", payload, stop)
            at, _ = _find(data, "tfhd", *traf)
            flags = int.from_bytes(data[at + 1 : at + 4], "big")
            pos = at + 8 + (8 if flags & 1 else 0) + (4 if flags & 2 else 0)
            duration = struct.unpack_from(">I", data, pos)[0] if flags & 8 else trex_duration
            at, _ = _find(data, "tfdt", *traf)
            fmt = ">Q" if data[at] == 1 else ">I"
            (decode,) = struct.unpack_from(fmt, data, at + 4)
            at, _ = _find(data, "trun", *traf)
            version, tr_flags = data[at], int.from_bytes(data[at + 1 : at + 4], "big")
            (n,) = struct.unpack_from(">I", data, at + 4)
            pos = at + 8 + (4 if tr_flags & 1 else 0) + (4 if tr_flags & 4 else 0)
            fields = [f for f in (0x100, 0x200, 0x400, 0x800) if tr_flags & f]
            for _ in range(n):
                row = dict(
                    zip(fields, struct.unpack_from(f">{len(fields)}I", data, pos), strict=True)
                )
                pos += 4 * len(fields)
                d = row.get(0x100, duration)
                cto = row.get(0x800, 0)
                if version == 1 and cto >= 1 << 31:
                    cto -= 1 << 32
                times.append((decode + cto, decode + cto + d))
                decode += d
        segments.append((min(t for t, _ in times), max(e for _, e in times)))
    return Track(timescale, media_time, tuple(segments))


@pytest.fixture(scope="module")
def video(package: Path, title: Title) -> Track:
    return read_track(package / Path(title.rungs[0].init).parent)


@pytest.fixture(scope="module")
def audio(package: Path, title: Title) -> Track:
    return read_track(package / Path(title.audio[0].init).parent)


def test_the_reader_reads_a_video_track_from_zero(video: Track, title: Title) -> None:
    # The video needs no edit list: negative composition offsets start it at 0.
    assert video.media_time == 0
    assert video.span == (
        Fraction(0),
        Fraction(title.shots[-1].end_frame) / Fraction(title.frame_rate),
    )


def test_audio_presents_from_zero_and_as_long_as_the_video(audio: Track, video: Track) -> None:
    frame = Fraction(AAC_FRAME, audio.timescale)
    assert audio.timescale == 48000
    # the edit list skips the priming: what is presented first is the first real sample
    assert audio.media_time > 0
    start, end = audio.span
    assert abs(start - video.span[0]) < frame
    assert abs(end - video.span[1]) < frame, (float(end), float(video.span[1]))


def test_audio_segments_start_with_the_video_segments(audio: Track, video: Track) -> None:
    frame = Fraction(AAC_FRAME, audio.timescale)
    assert len(audio.segments) == len(video.segments)
    for k in range(len(video.segments)):
        a_start, a_end = audio.presented(k)
        v_start, v_end = video.presented(k)
        assert 0 <= a_start - v_start < frame, (k, float(a_start), float(v_start))
        assert abs(a_end - v_end) < frame, (k, float(a_end), float(v_end))


def test_manifests_say_what_the_tracks_present(
    package: Path, title: Title, audio: Track, video: Track
) -> None:
    end = video.span[1]
    assert Fraction(title.duration_s).limit_denominator(10**6) == end
    mpd = MPEGDASHParser.parse(str(package / "manifest.mpd"))
    text = (package / "manifest.mpd").read_text()
    declared = re.search(r'mediaPresentationDuration="PT([0-9.]+)S"', text)
    assert declared is not None and float(declared.group(1)) == pytest.approx(float(end))

    adaptation = next(a for a in mpd.periods[0].adaptation_sets if a.content_type == "audio")
    template = adaptation.segment_templates[0]
    assert template.timescale == audio.timescale
    timeline = []
    t = 0
    for s in template.segment_timelines[0].Ss:
        t = s.t if s.t is not None else t
        for _ in range((s.r or 0) + 1):
            timeline.append((Fraction(t, audio.timescale), Fraction(t + s.d, audio.timescale)))
            t += s.d
    assert timeline == [audio.presented(k) for k in range(len(audio.segments))]

    playlist = m3u8.load(str(package / title.audio[0].playlist))
    assert len(playlist.segments) == len(audio.segments)
    for k, segment in enumerate(playlist.segments):
        start, stop = audio.presented(k)
        assert segment.duration == pytest.approx(float(stop - start), abs=1e-6)
    assert sum(s.duration for s in playlist.segments) == pytest.approx(float(end), abs=1e-5)

    rendition = title.audio[0]
    assert [
        (
            Fraction(s.start_ticks, rendition.timescale),
            Fraction(s.duration_ticks, rendition.timescale),
        )
        for s in rendition.segments
    ] == [(a, b - a) for a, b in (audio.presented(k) for k in range(len(audio.segments)))]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray() for f in container.decode(container.streams.audio[0])]
    return np.concatenate(frames, axis=1)[0]  # planar: the first channel


def _onset(samples: np.ndarray) -> int:
    """Index of the first sample above a quarter of the peak: where the tone starts."""
    return int(np.argmax(np.abs(samples) > 0.25 * np.max(np.abs(samples))))


def test_the_first_sample_presented_is_the_first_of_the_source(
    package: Path, title: Title, tiny_source: Path, tmp_path: Path
) -> None:
    """Decoded through ffmpeg (which applies the edit list as a player does), the tone starts
    where it starts in the source, not one AAC frame later."""
    directory = package / Path(title.audio[0].init).parent
    names = sorted(directory.glob("seg_*.m4s"), key=lambda p: int(p.stem.split("_")[1]))
    whole = tmp_path / "audio.mp4"
    whole.write_bytes(b"".join(p.read_bytes() for p in [directory / "init.mp4", *names]))
    packaged, source = _decode(whole), _decode(tiny_source)
    assert abs(_onset(packaged) - _onset(source)) < AAC_FRAME // 32


@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM}")
def test_chromium_buffers_audio_and_video_to_the_same_end(package: Path, title: Title) -> None:
    """Appended into Media Source Extensions (as hls.js and dash.js do), the audio buffers from
    0 to the video's end: Chromium applies the init segment's edit list."""
    from playwright.sync_api import Route, sync_playwright

    page_html = """<video id=v></video><script>
    window.buffered = async (mime, urls) => {
      const ms = new MediaSource();
      document.getElementById('v').src = URL.createObjectURL(ms);
      await new Promise(r => ms.addEventListener('sourceopen', r, {once: true}));
      const sb = ms.addSourceBuffer(mime);
      for (const u of urls) {
        sb.appendBuffer(await (await fetch(u)).arrayBuffer());
        await new Promise(r => sb.addEventListener('updateend', r, {once: true}));
      }
      const out = [];
      for (let i = 0; i < sb.buffered.length; i++) {
        out.push([sb.buffered.start(i), sb.buffered.end(i)]);
      }
      return out;
    };
    </script>"""

    def serve(route: Route) -> None:
        path = route.request.url.removeprefix("http://package.test/")
        if path == "index.html":
            route.fulfill(body=page_html, content_type="text/html")
        else:
            route.fulfill(body=(package / path).read_bytes(), content_type="video/mp4")

    def urls(init: str, count: int) -> list[str]:
        directory = Path(init).parent
        names = [init] + [str(directory / f"seg_{n}.m4s") for n in range(1, count + 1)]
        return [f"http://package.test/{name}" for name in names]

    rung, rendition = title.rungs[0], title.audio[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.route("http://package.test/**", serve)
            page.goto("http://package.test/index.html")
            got = {
                kind: page.evaluate(
                    "([mime, urls]) => window.buffered(mime, urls)",
                    [f'{kind}/mp4; codecs="{codecs}"', urls(init, count)],
                )
                for kind, codecs, init, count in (
                    ("video", rung.codec_string, rung.init, len(rung.segment_bytes)),
                    ("audio", rendition.codec_string, rendition.init, len(rendition.segments)),
                )
            }
        finally:
            browser.close()
    # one range each, from 0 to the title's end (MSE reports microseconds, rounded down)
    for kind in ("video", "audio"):
        assert len(got[kind]) == 1, got
        start, end = got[kind][0]
        assert start == pytest.approx(0, abs=2e-6), got
        assert end == pytest.approx(title.duration_s, abs=2e-6), got


# ---------------------------------------------------------------------------------------------
# Where the audio is cut


@given(
    st.lists(st.integers(1, 4096), min_size=1, max_size=300),
    st.integers(0, 4096),
    st.data(),
)
def test_audio_cuts_start_each_segment_within_one_sample_of_its_boundary(
    durations: list[int], priming: int, data: st.DataObject
) -> None:
    starts = [-priming]
    for d in durations[:-1]:
        starts.append(starts[-1] + d)
    end = starts[-1] + durations[-1]
    # boundaries past 0, each somewhere in the sample before the one that should start a segment
    boundaries, expected = [0], [0]
    for i in range(1, len(starts)):
        if starts[i - 1] >= 0 and data.draw(st.booleans()):
            boundaries.append(starts[i] - data.draw(st.integers(0, durations[i - 1] - 1)))
            expected.append(i)
    cuts = audio_cuts(starts, boundaries, end)
    assert cuts == expected
    for cut, boundary in zip(cuts[1:], boundaries[1:], strict=True):
        # the first sample presented at or after the boundary, so less than a sample after it
        assert 0 <= starts[cut] - boundary < durations[cut - 1]


def test_audio_cuts_refuse_what_the_track_cannot_hold() -> None:
    starts = [-1024, 0, 1024, 2048]
    assert audio_cuts(starts, [0, 1000, 2000], 3072) == [0, 2, 3]
    with pytest.raises(PackagingError, match="ends at 3072"):
        audio_cuts(starts, [0, 3000], 3072)
    with pytest.raises(PackagingError, match="no sample"):
        audio_cuts(starts, [0, 100, 200], 3072)
    with pytest.raises(PackagingError, match="not after"):
        audio_cuts(starts, [0, 1000, 1000], 3072)
    with pytest.raises(PackagingError, match="no samples"):
        audio_cuts([], [0], 0)
