"""A channel's program recorded as a VOD source: what its DVR window holds, as one MP4.

``streamplane live record CHANNEL --out FILE.mp4`` reads the channel's files (a running
channel or a stopped one), takes the highest rung and the audio, and writes one MP4 the media
plane's ``encode`` accepts, so the program is re-encoded per shot like any title.

Each encoder run (a feed, a slate, the feed again) is its own init segment followed by its
segments, which are a fragmented MP4 when put end to end: the runs are read from the media
playlist (``recorded_runs``, pure), muxed with their audio by stream copy, and joined by one
re-encode at a high quality (a mezzanine, as a contribution recording is): runs need not share
their codec parameters (a slate is encoded apart), and the per-shot encoder wants a constant
frame rate from zero, which the runs' own timelines (each starting anywhere) do not give.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import av

from streamplane.live.ingest import AUDIO, LiveError
from streamplane.media.ffmpeg import FfmpegError, run_ffmpeg

__all__ = ["Run", "record_channel", "recorded_runs"]

_MAP: Final = re.compile(r'^#EXT-X-MAP:URI="([^"]+)"')
_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Run:
    """One encoder run's init segment and its whole segments, oldest first."""

    init: str
    segments: tuple[str, ...]
    seconds: float


def recorded_runs(playlist: str) -> list[Run]:
    """The encoder runs whose whole segments a media playlist lists (parts not yet in a
    whole segment are left out)."""
    runs: list[Run] = []
    init: str | None = None
    segments: list[str] = []
    seconds = 0.0
    duration: float | None = None
    for line in playlist.splitlines():
        line = line.strip()
        found = _MAP.match(line)
        if found is not None:
            if init is not None and segments:
                runs.append(Run(init, tuple(segments), seconds))
            init, segments, seconds = found.group(1), [], 0.0
        elif line.startswith("#EXTINF:"):
            duration = float(line.removeprefix("#EXTINF:").split(",")[0])
        elif line and not line.startswith("#") and duration is not None:
            if init is None or not _NAME.match(line) or not _NAME.match(init):
                raise LiveError(f"the playlist names {line!r} outside a run or oddly")
            segments.append(line)
            seconds += duration
            duration = None
    if init is not None and segments:
        runs.append(Run(init, tuple(segments), seconds))
    return runs


def record_channel(directory: Path, out: Path, rendition: str | None = None) -> list[Run]:
    """Write what ``directory`` (``<root>/<channel>``) holds as ``out``; the runs recorded.

    ``rendition`` is the video rendition taken (default: the highest rung). Raises
    :class:`LiveError` when the channel holds no whole segment yet.
    """
    if not directory.is_dir():
        raise LiveError(f"no channel at {directory}")
    videos = sorted(
        (p.name for p in directory.iterdir() if re.fullmatch(r"v\d+", p.name)),
        key=lambda name: -int(name[1:]),
    )
    video = rendition or (videos[0] if videos else None)
    if video is None or not (directory / video / "index.m3u8").is_file():
        raise LiveError(f"{directory} has no video rendition {video or ''} to record".strip())
    runs = recorded_runs((directory / video / "index.m3u8").read_text())
    if not runs:
        raise LiveError(f"channel {directory.name} has no whole segment to record yet")
    audio_runs: dict[str, Run] = {}
    if (directory / AUDIO / "index.m3u8").is_file():
        audio_runs = {
            r.init: r for r in recorded_runs((directory / AUDIO / "index.m3u8").read_text())
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".record-", dir=out.parent) as tmp_name:
        tmp = Path(tmp_name)
        pieces = []
        for i, run in enumerate(runs):
            video_file = _join(directory / video, run, tmp / f"v{i}.mp4")
            inputs = ["-i", str(video_file)]
            maps = ["-map", "0:v:0"]
            audio = audio_runs.get(run.init)
            if audio is not None:
                inputs += ["-i", str(_join(directory / AUDIO, audio, tmp / f"a{i}.mp4"))]
                maps += ["-map", "1:a:0"]
            piece = tmp / f"run{i}.mp4"
            _ffmpeg([*inputs, *maps, "-c", "copy", str(piece)], f"muxing run {run.init}")
            pieces.append(piece)
        result = tmp / "program.mp4"
        listing = tmp / "runs.txt"
        listing.write_text("".join(f"file '{p.name}'\n" for p in pieces))
        with av.open(str(tmp / "v0.mp4")) as first:
            stream = first.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 25
        # One re-encode at a high quality joins the runs whatever their codec parameters (a
        # slate is encoded apart), and makes the constant frame rate from zero the per-shot
        # encoder plans its segments on (the runs' own timelines start anywhere, with gaps).
        mezzanine = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "16"]
        mezzanine += ["-vf", f"fps={rate}", "-fps_mode", "cfr"]
        mezzanine += ["-c:a", "aac", "-b:a", "160k", "-af", "aresample=async=1:first_pts=0"]
        _ffmpeg(
            ["-f", "concat", "-safe", "0", "-i", str(listing), *mezzanine]
            + ["-movflags", "+faststart", str(result)]
        )
        shutil.move(result, out)
    return runs


def _join(rendition: Path, run: Run, target: Path) -> Path:
    """A run's init segment and segments end to end: a fragmented MP4."""
    try:
        with target.open("wb") as f:
            f.write((rendition / run.init).read_bytes())
            for name in run.segments:
                f.write((rendition / name).read_bytes())
    except FileNotFoundError as exc:
        # the DVR window slid while we read: the caller records again
        raise LiveError(f"{exc.filename} left the DVR window while it was recorded") from None
    return target


def _ffmpeg(args: list[str], what: str = "recording the channel") -> None:
    try:
        run_ffmpeg(args, what)
    except FfmpegError as exc:
        raise LiveError(str(exc)) from None
