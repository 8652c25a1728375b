"""A live channel's ingest: ffmpeg listens for the contribution feed and encodes the live ladder.

One ffmpeg process per feed connection listens on the channel's SRT port (the stream key is
the SRT passphrase: a publisher with another key fails the handshake and never gets a byte in),
and writes each rung, and the audio, as fragmented MP4 with a fragment per part target to a
pipe of its own. This shell splits those pipes into boxes, hands the fragments to each
rendition's :class:`~streamplane.live.track.TrackPackager`, carries out its effects on disk,
rewrites the playlists, and wakes the requests waiting on them. When the feed goes (ffmpeg
exits), the open segments close and a new listener waits; what the next feed brings follows a
discontinuity.

Channel layout under ``<root>/<channel>/``: ``master.m3u8``, ``status.json``, and per
rendition ``<rendition>/index.m3u8``, ``init_<run>.mp4``, ``seg_<n>.m4s``, ``seg_<n>.<p>.m4s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from streamplane.lifetime import child_setup
from streamplane.live.mpd import DashRendition, live_mpd
from streamplane.live.playlist import Rendition, Window, master_playlist, media_playlist
from streamplane.live.track import Fragment, RemoveObject, TrackPackager, WriteObject
from streamplane.media.ffmpeg import ffmpeg_exe
from streamplane.media.fmp4 import TrackInit, read_fragment, read_init

__all__ = [
    "AUDIO",
    "BoxSplitter",
    "Channel",
    "ChannelSettings",
    "LiveError",
    "Rung",
    "encoder_args",
    "feed_problem",
    "font",
    "parse_rungs",
]

log = logging.getLogger("streamplane.live")

AUDIO: Final = "audio"
FONT_CANDIDATES: Final = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
)
_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_STDERR_KEEP: Final = 40
_RTMP_KEY: Final = re.compile(r"^[A-Za-z0-9._~-]+$")


class LiveError(ValueError):
    """A channel's settings cannot work; the message says which and why."""


@dataclass(frozen=True)
class Rung:
    """One rung of the live ladder: its height and video bitrate."""

    height: int
    kbps: int

    @property
    def name(self) -> str:
        return f"v{self.height}"


def parse_rungs(text: str) -> tuple[Rung, ...]:
    """``"360:800,240:400"`` (height:kbps, highest first) as rungs."""
    rungs = []
    for item in text.split(","):
        height, sep, kbps = item.strip().partition(":")
        if not sep or not height.isdigit() or not kbps.isdigit():
            raise LiveError(f"a rung is HEIGHT:KBPS, such as 240:400, not {item.strip()!r}")
        if not 64 <= int(height) <= 2160 or int(height) % 2:
            raise LiveError(f"a rung's height must be even and within 64..2160, not {height}")
        if not 32 <= int(kbps) <= 50_000:
            raise LiveError(f"a rung's bitrate must be within 32..50000 kbps, not {kbps}")
        rungs.append(Rung(int(height), int(kbps)))
    if len({r.height for r in rungs}) != len(rungs):
        raise LiveError("two rungs share a height")
    return tuple(sorted(rungs, key=lambda r: -r.height))


@dataclass(frozen=True)
class ChannelSettings:
    name: str
    root: Path
    srt_port: int
    stream_key: str
    rungs: tuple[Rung, ...] = (Rung(240, 400), Rung(144, 150))
    audio: bool = True
    fps: int = 24
    part_target: float = 0.5
    segment_target: float = 2.0
    dvr_seconds: float = 7200.0
    listen_host: str = "127.0.0.1"
    preset: str = "ultrafast"
    slate: bool = True  # fill a lost feed's gap with a card until it comes back
    rtmp_port: int | None = None  # also take an RTMP publisher here (relayed to the SRT port)

    def check(self) -> None:
        if not _NAME.match(self.name):
            raise LiveError(
                f"channel name {self.name!r}: lower-case letters, digits, '-' and '_' only"
            )
        # SRT's passphrase rules: 10 to 79 characters (libsrt refuses others at connect time).
        if not 10 <= len(self.stream_key) <= 79:
            raise LiveError("the stream key must be 10 to 79 characters (it is the SRT passphrase)")
        if not 1 <= self.srt_port <= 65535:
            raise LiveError(f"SRT port {self.srt_port} is not a port number")
        if self.rtmp_port is not None:
            if not 1 <= self.rtmp_port <= 65535:
                raise LiveError(f"RTMP port {self.rtmp_port} is not a port number")
            if not _RTMP_KEY.match(self.stream_key):
                raise LiveError(
                    "over RTMP the stream key is the stream name: letters, digits, '.', '_', "
                    "'~' and '-' only"
                )
        if not self.rungs:
            raise LiveError("a live ladder needs at least one rung")
        frames = self.part_target * self.fps
        if abs(frames - round(frames)) > 1e-6 or round(frames) < 1:
            raise LiveError(
                f"a part of {self.part_target} s is not a whole number of frames at {self.fps} fps"
            )
        parts = self.segment_target / self.part_target
        if abs(parts - round(parts)) > 1e-6:
            raise LiveError("the segment target must be a whole number of part targets")

    @property
    def renditions(self) -> list[str]:
        return [r.name for r in self.rungs] + ([AUDIO] if self.audio else [])

    @property
    def directory(self) -> Path:
        return self.root / self.name


def listener_input(settings: ChannelSettings, port: int | None = None) -> tuple[list[str], str]:
    """The input of a feed run: one SRT publisher with the stream key; and its audio. With
    ``port``, the listener is private, on loopback behind the channel's SRT port (``srt``)."""
    s = settings
    host, port = (s.listen_host, s.srt_port) if port is None else ("127.0.0.1", port)
    listen = (
        f"srt://{host}:{port}?mode=listener"
        f"&passphrase={s.stream_key}&enforced_encryption=1&latency=120000"
    )
    options = ["-fflags", "nobuffer", "-analyzeduration", "1000000", "-probesize", "500000"]
    return [*options, "-i", listen], "0:a:0?"


def slate_input(settings: ChannelSettings, font: Path | None) -> tuple[list[str], str]:
    """The input of a slate run: a card saying the feed is lost, and silence."""
    height = settings.rungs[0].height
    width = (height * 16 // 9) // 2 * 2
    card = f"color=c=0x1d2330:s={width}x{height}:r={settings.fps}"
    if font is not None:
        card += (
            f",drawtext=fontfile={font}:text='{settings.name} · back in a moment':"
            "x=(w-tw)/2:y=(h-th)/2:fontsize=h/14:fontcolor=white"
        )
    return [
        "-re",
        "-f",
        "lavfi",
        "-i",
        card,
        "-re",
        "-f",
        "lavfi",
        "-i",
        "anullsrc=r=48000:cl=stereo",
    ], "1:a"


def encoder_args(
    settings: ChannelSettings, fds: list[int], source: tuple[list[str], str] | None = None
) -> list[str]:
    """ffmpeg's arguments: read ``source`` (by default, listen for one SRT feed) and write
    each rendition of the ladder to its descriptor."""
    s = settings
    inputs, audio_map = source if source is not None else listener_input(settings)
    gop = round(s.segment_target * s.fps)
    # frag_discont keeps each run's timestamps as they came, so audio and video of one run
    # stay in step (without it, each output's first fragment is moved to zero on its own).
    fragmented = [
        "-movflags",
        "+frag_keyframe+empty_moov+default_base_moof+cmaf+frag_discont",
        "-frag_duration",
        str(round(s.part_target * 1_000_000)),
        "-flush_packets",
        "1",
        "-f",
        "mp4",
    ]
    split = f"[0:v]fps={s.fps},split={len(s.rungs)}" + "".join(
        f"[s{i}]" for i in range(len(s.rungs))
    )
    scales = ";".join(f"[s{i}]scale=-2:{r.height}[o{i}]" for i, r in enumerate(s.rungs))
    args = [
        *inputs,
        "-filter_complex",
        f"{split};{scales}",
    ]
    for i, (rung, fd) in enumerate(zip(s.rungs, fds, strict=False)):
        args += [
            "-map",
            f"[o{i}]",
            "-c:v",
            "libx264",
            "-preset",
            s.preset,
            "-tune",
            "zerolatency",
            "-bf",
            "0",
            "-g",
            str(gop),
            "-keyint_min",
            str(gop),
            "-sc_threshold",
            "0",
            "-force_key_frames",
            f"expr:gte(t,n_forced*{s.segment_target})",
            "-b:v",
            f"{rung.kbps}k",
            "-maxrate",
            f"{rung.kbps}k",
            "-bufsize",
            f"{rung.kbps // 2}k",
            "-threads",
            "1",
            *fragmented,
            f"pipe:{fd}",
        ]
    if s.audio:
        args += [
            "-map",
            audio_map,
            "-c:a",
            "aac",
            "-b:a",
            "64k",
            "-ar",
            "48000",
            "-ac",
            "2",
            *fragmented,
            f"pipe:{fds[len(s.rungs)]}",
        ]
    return args


def feed_problem(line: str) -> str | None:
    """What a line of the listener's log says went wrong with a publisher, if anything."""
    if "BADSECRET" in line or "Incorrect passphrase" in line:
        return "refused a publisher: wrong stream key"
    if "enforced encryption" in line or "NOSECRET" in line:
        return "refused a publisher: no stream key"
    if "Invalid data found when processing input" in line:
        return "refused the feed: not a stream ffmpeg can read (expected MPEG-TS over SRT)"
    if "does not contain any stream" in line or "matches no streams" in line:
        return "refused the feed: it lacks a video or an audio stream the channel encodes"
    return None


class BoxSplitter:
    """Top-level ISO-BMFF boxes out of a byte stream that arrives in arbitrary pieces."""

    def __init__(self, limit: int = 64 << 20) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        buf = self._buf
        buf += data
        boxes = []
        pos = 0
        while len(buf) - pos >= 8:
            size = int.from_bytes(buf[pos : pos + 4], "big")
            kind = bytes(buf[pos + 4 : pos + 8]).decode("latin-1")
            if size == 1 and len(buf) - pos >= 16:
                size = int.from_bytes(buf[pos + 8 : pos + 16], "big")
            elif size == 1:
                break
            if size < 8 or size > self._limit:
                raise LiveError(f"the encoder wrote a box {kind!r} of {size} bytes")
            if len(buf) - pos < size:
                break
            boxes.append((kind, bytes(buf[pos : pos + size])))
            pos += size
        del buf[:pos]
        return boxes


@dataclass
class _Output:
    """One rendition's pipe from the encoder, as its boxes arrive."""

    rendition: str
    source: str  # "feed" or "slate"
    splitter: BoxSplitter = field(default_factory=BoxSplitter)
    head: list[bytes] = field(default_factory=list)  # ftyp + moov, until the moov
    init: TrackInit | None = None
    pending: list[bytes] = field(default_factory=list)  # a fragment's boxes before its mdat


class Channel:
    """One live channel: its renditions' packagers, the encoder runs feeding them, its status.

    ``changed`` is notified whenever a playlist was rewritten (the origin's blocking reloads
    wait on it).
    """

    def __init__(self, settings: ChannelSettings, *, clock: Callable[[], float] = time.time):
        settings.check()
        self.settings = settings
        self.clock = clock
        self.tracks = {
            name: TrackPackager(settings.part_target, settings.segment_target, settings.dvr_seconds)
            for name in settings.renditions
        }
        self.changed = asyncio.Condition()
        self.state = "starting"
        self.runs = 0
        self.problems: list[dict[str, str | float]] = []
        self.last_log: list[str] = []
        self._last_problem = ("", 0.0)
        self._master_due = False
        self._codecs: dict[str, TrackInit] = {}
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._active = "feed"  # the run whose fragments go on air
        self._stopping = False
        # The encoder's listener behind the channel's SRT port (set by live.srt.SrtDoor);
        # None: the listener is the SRT port itself.
        self.listen_port: int | None = None
        # Moves on with each listener run and each publisher the listener refused: a
        # publisher that never got on air in this run no longer holds the SRT port.
        self.publisher_epoch = 0
        # What became of the program's recording as a VOD source, once asked for (see
        # live.service: the channel records itself when it ends).
        self.recording: dict[str, object] | None = None

    # -- what the origin reads --------------------------------------------------------------

    def window(self, rendition: str) -> Window:
        return self.tracks[rendition].window()

    def status(self) -> dict[str, object]:
        s = self.settings
        return {
            "channel": s.name,
            "state": self.state,
            "srt_port": s.srt_port,
            "rtmp_port": s.rtmp_port,
            "runs": self.runs,
            "renditions": s.renditions,
            "part_target": s.part_target,
            "segment_target": s.segment_target,
            "dvr_seconds": s.dvr_seconds,
            "problems": self.problems[-20:],
            "newest": {name: track.window().last_part() for name, track in self.tracks.items()},
            "recording": self.recording,
        }

    # -- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """Listen for feeds until :meth:`stop`: each connection is one encoder run. Once a
        feed was lost, a slate fills the channel until the next feed comes."""
        directory = self.settings.directory
        for name in self.settings.renditions:
            (directory / name).mkdir(parents=True, exist_ok=True)
        self._write_status()
        try:
            while not self._stopping:
                self._active = "feed"
                self.publisher_epoch += 1
                listen = listener_input(self.settings, self.listen_port)
                feed = asyncio.create_task(self._encode("feed", listen))
                slate = None
                if self.runs > 0 and self.settings.slate:
                    self._active = "slate"
                    source = slate_input(self.settings, font())
                    slate = asyncio.create_task(self._encode("slate", source))
                try:
                    await feed
                finally:
                    if slate is not None:
                        slate.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await slate
                if not self._stopping:
                    await asyncio.sleep(0.2)  # a publisher that keeps failing costs little
        finally:
            for name, track in self.tracks.items():
                self._carry_out(name, track.end(), rewrite=True)
            self.state = "stopped"
            self._write_status()
            await self._notify()

    async def stop(self) -> None:
        self._stopping = True
        for process in list(self._processes.values()):
            if process.returncode is None:
                process.terminate()

    async def _encode(self, source: str, inputs: tuple[list[str], str]) -> None:
        """One encoder run of ``source`` ("feed": the SRT listener; "slate"), until it ends."""
        s = self.settings
        pipes = [os.pipe() for _ in s.renditions]
        write_fds = [w for _, w in pipes]
        if source == "feed":
            self.state = "waiting for the feed" if self.runs == 0 else "feed lost; waiting for it"
            self._write_status()
        try:
            process = await start_ffmpeg(encoder_args(s, write_fds, inputs), write_fds)
        except BaseException:
            for r, _ in pipes:
                os.close(r)
            raise
        finally:
            for w in write_fds:
                os.close(w)
        self._processes[source] = process
        outputs = [_Output(name, source) for name in s.renditions]
        readers = [
            asyncio.create_task(self._read_output(out, r))
            for out, (r, _) in zip(outputs, pipes, strict=True)
        ]
        assert process.stderr is not None
        log_task = asyncio.create_task(self._read_log(process.stderr, source))
        try:
            await asyncio.gather(*readers)
            await log_task
            await process.wait()
        finally:
            for task in (*readers, log_task):
                task.cancel()
            if process.returncode is None:
                process.kill()
                await process.wait()
            del self._processes[source]
        began = any(out.init is not None for out in outputs)
        if self._active == source:  # what it fed ends here (a slate the feed replaced, not)
            for out in outputs:
                if out.init is not None:
                    self._carry_out(out.rendition, self.tracks[out.rendition].interrupt())
        if began:
            self._write_status()
            await self._notify()
        elif process.returncode not in (0, None) and not self._stopping and source == "feed":
            tail = " / ".join(self.last_log[-3:]) or f"ffmpeg exited with {process.returncode}"
            self.problem(f"the listener stopped before any feed: {tail}")

    async def _read_output(self, out: _Output, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while data := await reader.read(1 << 16):
                for kind, box in out.splitter.feed(data):
                    await self._box(out, kind, box)
        finally:
            transport.close()

    async def _box(self, out: _Output, kind: str, box: bytes) -> None:
        track = self.tracks[out.rendition]
        if out.source != self._active:
            if out.source != "feed" or kind != "moov":
                return  # a slate the feed replaced: what it still writes goes nowhere
            # The feed is back: it replaces the slate from its first init segment on.
            self._active = "feed"
            slate = self._processes.get("slate")
            if slate is not None and slate.returncode is None:
                slate.terminate()
        if kind == "ftyp":
            out.head = [box]
            out.init = None
        elif kind == "moov":
            init_bytes = b"".join(out.head) + box
            out.init = read_init(init_bytes)
            self._codecs[out.rendition] = out.init
            if out.rendition == self.settings.renditions[0]:
                if out.source == "feed":
                    self.runs += 1
                    self.state = "live"
                else:
                    self.state = "feed lost; slate on air"
                self._write_status()
            self._carry_out(out.rendition, track.begin(init_bytes))
            self._master_due = True
        elif kind in ("moof", "styp", "prft", "emsg"):
            out.pending.append(box)
        elif kind == "mdat" and out.init is not None and out.pending:
            data = b"".join(out.pending) + box
            out.pending = []
            init = out.init
            info = read_fragment(data, init.default_sample_duration, init.default_sample_flags)
            fragment = Fragment(
                start=info.base_media_decode_time / init.timescale,
                duration=info.duration / init.timescale,
                independent=info.first_sample_is_sync,
                data=data,
            )
            await self.publish(out.rendition, track.push(fragment, self.clock()))
            if self._master_due and all(
                t.window().last_part() is not None for t in self.tracks.values()
            ):
                # announced once every rendition has a part a player can ask for
                self._master_due = False
                self._write_master()
        # mfra and anything else at the end of a run carry nothing a player needs

    async def _read_log(self, stream: asyncio.StreamReader, source: str) -> None:
        while line_bytes := await stream.readline():
            line = line_bytes.decode("utf-8", "replace").rstrip()
            if source != "feed":
                log.debug("channel %s %s: %s", self.settings.name, source, line)
                continue
            self.last_log = (self.last_log + [line])[-_STDERR_KEEP:]
            problem = feed_problem(line)
            if problem is not None:
                self.publisher_epoch += 1
                self.problem(problem)

    def problem(self, message: str) -> None:
        """Say what went wrong with a publisher or a feed: in the log and on the status."""
        now = self.clock()
        # libsrt logs one refused handshake on several lines: one refusal, one entry
        kind, at = self._last_problem
        self._last_problem = (message.split(":")[0], now)
        if kind == self._last_problem[0] and now - at < 0.5:
            return
        log.warning("channel %s: %s", self.settings.name, message)
        self.problems.append({"at": round(now, 3), "problem": message})
        self._write_status()

    async def publish(self, rendition: str, effects: list[WriteObject | RemoveObject]) -> None:
        """Carry out a packager's effects for ``rendition`` and wake who waits on them."""
        self._carry_out(rendition, effects)
        await self._notify()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def mpd(self, now: float) -> str | None:
        """The channel's DASH MPD at wall-clock ``now``; None before every rendition began."""
        if len(self._codecs) != len(self.settings.renditions):
            return None
        rungs = {r.name: r for r in self.settings.rungs}
        renditions = [
            DashRendition(
                id=name,
                codecs=self._codecs[name].codec_string,
                bandwidth=64_000 if name == AUDIO else rungs[name].kbps * 1000,
                window=self.tracks[name].window(),
                width=self._codecs[name].width,
                height=self._codecs[name].height,
                audio=name == AUDIO,
            )
            for name in self.settings.renditions  # highest rung first, the audio last
        ]
        if not any(s.duration for s in renditions[0].window.segments):
            return None
        return live_mpd(renditions, now, self.settings.dvr_seconds)

    # -- files ------------------------------------------------------------------------------

    def _carry_out(
        self, rendition: str, effects: list[WriteObject | RemoveObject], *, rewrite: bool = False
    ) -> None:
        base = self.settings.directory / rendition
        for effect in effects:
            if isinstance(effect, WriteObject):
                _write_atomic(base / effect.name, effect.data)
            else:
                (base / effect.name).unlink(missing_ok=True)
        if effects or rewrite:
            window = self.tracks[rendition].window()
            _write_atomic(base / "index.m3u8", media_playlist(window).encode())

    def _write_master(self) -> None:
        renditions = []
        rungs = {r.name: r for r in self.settings.rungs}
        for name, init in self._codecs.items():
            if name == AUDIO:
                renditions.append(
                    Rendition(f"{name}/index.m3u8", init.codec_string, 64_000, audio=True)
                )
            else:
                renditions.append(
                    Rendition(
                        f"{name}/index.m3u8",
                        init.codec_string,
                        rungs[name].kbps * 1000,
                        init.width,
                        init.height,
                    )
                )
        if len(renditions) == len(self.settings.renditions):  # every rendition began
            text = master_playlist(renditions)
            _write_atomic(self.settings.directory / "master.m3u8", text.encode())

    def recorded(self, recording: dict[str, object]) -> None:
        """The recording's progress or outcome, on the status."""
        self.recording = recording
        self._write_status()

    def _write_status(self) -> None:
        body = json.dumps(self.status(), indent=1).encode()
        _write_atomic(self.settings.directory / "status.json", body)


def font() -> Path | None:
    """A font drawtext can burn text with, if the machine has one."""
    return next((f for f in FONT_CANDIDATES if f.is_file()), None)


async def start_ffmpeg(
    args: list[str], pass_fds: list[int] | None = None
) -> asyncio.subprocess.Process:
    """A channel's ffmpeg (encoder or relay): quiet but for warnings, read through stderr, and
    killed with the channel's process however it dies, so no orphan keeps a port."""
    return await asyncio.create_subprocess_exec(
        ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "warning",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        pass_fds=pass_fds or [],
        preexec_fn=child_setup(),
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one whole, never a file being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
