"""A headless viewer: real HTTP to the control plane and the edges, the ABR objects of
`player/abr.py`, the bookkeeping of `player/headless.py`. The load generator of `swarm.py`.

One session, as a player does it:

1. `POST /v1/playback` (the auth header is given: see `sign_in`), which answers the session,
   the ranked edges with a signed token each, the heartbeat URL and token, the resume position;
2. `title.json` from the first ranked edge: per-rung, per-segment sizes and VMAF, timing;
3. a loop over segments: wait while the next one would not fit in the buffer, ask the ABR for
   a rung (`AbrState` from the play-out clock and the last downloads), fetch the audio segments
   due by then, the rung's init segment once, and the video segment, streamed: every `tick_s`
   the ABR may abandon it for a lower rung (`should_abandon` with the bytes so far);
4. play out what is buffered, send a last heartbeat with `kind: "stop"` (the screen is free at
   once), and return a `ViewerResult`.

An error or a timeout from an edge (connection refused or reset, a non-200 answer, no byte
for `request_timeout_s`) moves the viewer to the next ranked edge, keeping its position; the
session fails only when every edge has failed.

Time. The session clock runs `speed` times the wall clock: media plays out `speed` times as
fast, and a throttled link (`trace`) follows its trace in session time, its bits paced by a
token bucket, so an accelerated session is the real one compressed. Request latencies of the
real network count `speed` times over (a 2 ms request at speed 10 is 20 ms of session time), so
startup figures at high speeds are upper bounds. Heartbeats follow the cadence of
`player/cadence.py` on the wall clock, so the control plane sees real viewers' heartbeat rate
whatever the speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import posixpath
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx
import msgspec

from streamplane.media.title import Title, decode_title
from streamplane.player.abr import (
    AbrState,
    Download,
    Progress,
    RecentRate,
    checked_abandon,
    checked_choice,
    make_abr,
)
from streamplane.player.cadence import CadenceState, next_heartbeat_s
from streamplane.player.errors import ManifestError, PlayerError
from streamplane.player.headless import (
    Ledger,
    Playout,
    SegmentRecord,
    TraceBucket,
    ViewerResult,
    audio_plan,
    heartbeat_event,
    viewer_result,
)
from streamplane.player.live import (
    AudioRendition,
    LivePart,
    LivePlaylist,
    join_part,
    live_rung,
    next_number,
    parse_audio_rendition,
    parse_live_playlist,
    parse_variants,
    part_after,
    playback_rate,
)
from streamplane.player.sim import Manifest, loop_manifest, manifest_from_title
from streamplane.player.traces import Trace

__all__ = ["Viewer", "ViewerConfig", "ViewerError", "ViewerStatus", "sign_in", "watch"]

ViewerStatus = Literal["waiting", "starting", "playing", "rebuffering", "done", "failed"]


class ViewerError(PlayerError):
    """A viewer could not play: the control plane refused, or every edge failed."""


class ViewerConfig(msgspec.Struct, frozen=True):
    control_url: str
    title: str
    abr: str = "streamplane"
    device: str = "headless"
    speed: float = 1.0  # session seconds per wall second
    max_buffer_s: float = 30.0
    startup_buffer_s: float | None = None  # None: the first segment's duration
    duration_s: float | None = None  # media to watch; None: the title once (longer loops it)
    resume: bool = False  # start at the playback answer's resume position
    audio: bool = True
    trace: Trace | None = None  # throttle to this link (session time)
    burst_bytes: int = 8192  # the throttle's token bucket
    request_timeout_s: float = 5.0  # wall seconds to connect, or between two bytes
    control_timeout_s: float = 30.0  # wall seconds for the control plane to answer
    playback_attempts: int = 3  # a 503 (no edge offered now) is asked again...
    playback_retry_s: float = 1.0  # ...after this many wall seconds
    tick_s: float = 0.25  # session seconds between abandonment checks
    history: int = 20  # downloads kept in the ABR state
    chunk_bytes: int | None = None  # None: as they come off the socket (up to 64 KiB)
    target_latency_s: float | None = None  # live: None holds the playlist's PART-HOLD-BACK


LIVE_DEFAULT_S: Final = 30.0  # a live session's length when none is given


async def sign_in(
    client: httpx.AsyncClient, control_url: str, email: str, password: str, timeout: float = 60
) -> dict[str, str]:
    """Log in: the Authorization header of the access token."""
    try:
        r = await client.post(
            control_url.rstrip("/") + "/v1/auth/login",
            json={"email": email, "password": password},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise ViewerError(f"cannot reach the control plane at {control_url}: {_why(exc)}") from None
    if r.status_code != 200:
        raise ViewerError(f"login as {email} refused: {_refusal(r)}")
    return {"authorization": f"Bearer {r.json()['access_token']}"}


async def watch(
    client: httpx.AsyncClient, config: ViewerConfig, auth: Mapping[str, str], index: int = 0
) -> ViewerResult:
    """Play one session with `client`'s connection pool; never raises for a failed session
    (the result says why)."""
    return await Viewer(client, config, auth, index=index).run()


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _refusal(r: httpx.Response) -> str:
    try:
        body = r.json()
        return f"{r.status_code} {body.get('error', '')}: {body.get('detail', r.text)}".strip()
    except ValueError:
        return f"{r.status_code}: {r.text[:200]}"


def _json_object(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _retry_after(r: httpx.Response, default_s: float = 1.0) -> float:
    """Seconds a 429 or 503 says to wait: Retry-After (seconds), else the body's figure."""
    for value in (r.headers.get("retry-after"), _json_object(r).get("retry_after_s")):
        try:
            wait = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(wait) and wait >= 0:
            return min(wait, 600.0)
    return default_s


@dataclass
class _LiveAudio:
    """Where a live viewer is in the audio rendition."""

    path: str  # its media playlist
    playlist: LivePlaylist
    part: LivePart  # the next to fetch
    fetched_s: float = 0.0  # seconds of audio fetched since the join
    init: str | None = None  # the init segment fetched last


def _bare(uri: str) -> str:
    """A playlist URI without its query: the edge hands the session's token on in them, and
    the viewer adds its own."""
    return uri.partition("?")[0]


class _EdgeFailed(Exception):
    pass


class _Got(msgspec.Struct):
    nbytes: int
    seconds: float  # session seconds, request to last byte
    body: bytes | None = None
    abandoned_to: int | None = None


class Viewer:
    """One headless playback session. `run()` once."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: ViewerConfig,
        auth: Mapping[str, str],
        *,
        index: int = 0,
        source: str | None = None,
        on_edges: Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]] | None = None,
        on_part: Callable[[LivePart, str, bytes, float], None] | None = None,
        offer: Mapping[str, Any] | None = None,
    ) -> None:
        if config.speed <= 0 or not math.isfinite(config.speed):
            raise ViewerError(f"speed must be a positive number, not {config.speed}")
        self.client = client
        self.config = config
        self.auth = dict(auth)
        self.index = index
        self.source = source
        self.on_edges = on_edges
        # live: each part, its init segment's path, its body and when it arrived (epoch s)
        self.on_part = on_part
        # a playback answer given instead of asked for: an edge measured without a control
        # plane (bench/live.py); no heartbeats, no session to stop
        self._offer = dict(offer) if offer is not None else None
        self.live = False
        self.abr = make_abr(config.abr)
        self.status: ViewerStatus = "waiting"
        self.ledger = Ledger()
        self.playout = Playout(config.max_buffer_s, min(1.0, config.max_buffer_s))
        self.bucket = TraceBucket(config.trace, config.burst_bytes * 8) if config.trace else None
        self.session_id: str | None = None
        self.edges: list[dict[str, Any]] = []
        self.edge_index = 0
        self.first_edge: str | None = None
        self._queries: list[str] = []
        self._heartbeat: dict[str, Any] = {}
        self._pending: list[dict[str, Any]] = []
        self._poke = asyncio.Event()
        self._t0 = 0.0
        self._last_event_wall: float | None = None
        self._last_heartbeat_wall: float | None = None
        self._min_interval_s = 0.0  # the control plane's floor under the cadence
        self._not_before_wall: float | None = None  # its 429 said: not before then
        self._downloads: list[Download] = []
        self._session_over = False
        self._announced = False
        self._stopping = False

    # -- clocks ---------------------------------------------------------------------------------

    def wall(self) -> float:
        return time.monotonic() - self._t0

    def now(self) -> float:
        """Session clock."""
        return self.wall() * self.config.speed

    async def sleep_until(self, session_s: float) -> None:
        delay = (session_s - self.now()) / self.config.speed
        if delay > 0:
            await asyncio.sleep(delay)

    # -- events and heartbeats ------------------------------------------------------------------

    def _event(self, kind: str) -> None:
        self._pending.append(heartbeat_event(kind, time.time(), self.playout, self.ledger))
        self._last_event_wall = self.wall()
        self._poke.set()

    def _tick(self) -> None:
        """Bring the play-out clock to now; report playback starting and stalls beginning."""
        before = self.playout.rebuffer_events
        self.playout.advance(self.now())
        if self.playout.playing and not self._announced:
            self._announced = True
            self.status = "playing"
            self._event("play")
        if self.playout.rebuffer_events > before:
            self.status = "rebuffering"
            self._event("rebuffer")

    async def _send_heartbeat(self, kind: str = "position") -> bool:
        """Send the pending events and one of `kind`; whether the control plane took them."""
        url = self._heartbeat.get("url")
        if not url or self.session_id is None:
            return False
        events = [*self._pending, heartbeat_event(kind, time.time(), self.playout, self.ledger)]
        self._pending = []
        self._last_heartbeat_wall = self.wall()
        self.ledger.heartbeats_sent += 1
        try:
            r = await self.client.post(
                url,
                json={"session_id": self.session_id, "events": events[-1000:]},
                headers={"authorization": f"Bearer {self._heartbeat.get('token', '')}"},
                timeout=self.config.control_timeout_s,
            )
        except httpx.HTTPError as exc:
            self.ledger.error("control", f"heartbeat: {_why(exc)}")
            return False
        if r.status_code == 200:
            self.ledger.heartbeats_ok += 1
            answer = r.json()
            self.ledger.acknowledged_position_s = answer.get("resume_position_s")
            self._min_interval_s = float(answer.get("min_interval_s") or 0.0)
            return True
        if r.status_code == 429:  # slowed down, not refused: keep the events, wait as told
            self.ledger.heartbeats_throttled += 1
            self._pending = events[:-1] + self._pending
            self._not_before_wall = self.wall() + _retry_after(r)
            body = _json_object(r)
            self._min_interval_s = float(body.get("interval_s") or self._min_interval_s)
            return False
        self.ledger.error("control", f"heartbeat refused: {_refusal(r)}")
        if r.status_code == 410:
            self._session_over = True
        return False

    async def _stop(self) -> None:
        """End the session: a last heartbeat (`stop`), or else `DELETE /v1/playback/{id}`, so
        the screen is free now rather than at its timeout."""
        if self._offer is not None:
            return
        if self.session_id is None or self._session_over or await self._send_heartbeat("stop"):
            return
        url = f"{self.config.control_url.rstrip('/')}/v1/playback/{self.session_id}"
        try:
            r = await self.client.delete(
                url, headers=self.auth, timeout=self.config.control_timeout_s
            )
        except httpx.HTTPError as exc:
            self.ledger.error("control", f"stopping the session: {_why(exc)}")
            return
        if r.status_code not in (200, 204, 404):
            self.ledger.error("control", f"stopping the session: {_refusal(r)}")

    async def _heartbeats(self) -> None:
        """Send heartbeats on the cadence's schedule (wall clock) until cancelled."""
        if not self._heartbeat.get("url"):  # none asked for (a given offer): none to send
            return
        while not self._session_over and not self._stopping:
            self._tick()
            state = CadenceState(
                now_s=self.wall(),
                phase=self.playout.phase,
                last_event_s=self._last_event_wall,
                last_heartbeat_s=self._last_heartbeat_wall,
                min_interval_s=self._min_interval_s,
                not_before_s=self._not_before_wall,
            )
            due = next_heartbeat_s(state)
            if due <= state.now_s:
                await self._send_heartbeat()
                continue
            self._poke.clear()
            # wake for an event, and often enough to notice a stall or a phase change
            wait = min(due - state.now_s, 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), wait)

    # -- the session ----------------------------------------------------------------------------

    async def run(self) -> ViewerResult:
        self._t0 = time.monotonic()
        self.status = "starting"
        error: str | None = None
        beats: asyncio.Task[None] | None = None
        try:
            await self._start()
            beats = asyncio.create_task(self._heartbeats())
            if self.live:
                await self._play_live()
            else:
                await self._play(await self._title())
            self.status = "done"
        except ViewerError as exc:
            error = str(exc)
            self.status = "failed"
        except Exception as exc:  # a bug must not take the swarm down; it is reported
            error = f"internal error: {_why(exc)}"
            self.status = "failed"
        finally:
            self.playout.end(self.now())
            if beats is not None:
                self._stopping = True
                self._poke.set()
                try:
                    await asyncio.wait_for(beats, self.config.control_timeout_s)
                except (TimeoutError, asyncio.CancelledError):
                    beats.cancel()
            await self._stop()
        trace = self.config.trace.name if self.config.trace else None
        return viewer_result(
            self.index,
            self.playout,
            self.ledger,
            session_id=self.session_id,
            error=error,
            trace=trace,
            source=self.source,
        )

    async def _start(self) -> None:
        c = self.config
        if self._offer is not None:
            self._started(self._offer)
            if self.on_edges is not None:
                await self.on_edges(self.edges)
            return
        url = c.control_url.rstrip("/") + "/v1/playback"
        for attempt in range(c.playback_attempts):
            try:
                r = await self.client.post(
                    url,
                    json={"title": c.title, "device": c.device},
                    headers=self.auth,
                    timeout=c.control_timeout_s,
                )
            except httpx.HTTPError as exc:
                raise ViewerError(
                    f"cannot reach the control plane at {c.control_url}: {_why(exc)}"
                ) from None
            if r.status_code != 503 or attempt + 1 == c.playback_attempts:
                break
            # no edge is offered right now ("try again shortly"): as a player, ask again
            self.ledger.error("control", f"playback: {_refusal(r)}")
            await asyncio.sleep(c.playback_retry_s)
        if r.status_code != 200:
            raise ViewerError(f"playback of {c.title!r} refused: {_refusal(r)}")
        answer = r.json()
        self._started(answer)
        if c.resume and not self.live:
            self.playout.start_position_s = float(answer.get("resume_position_s") or 0.0)
        if self.on_edges is not None:
            await self.on_edges(self.edges)

    def _started(self, answer: Mapping[str, Any]) -> None:
        """Take the playback answer: the session, its edges, live or not."""
        c = self.config
        self.session_id = str(answer["session_id"])
        self._heartbeat = dict(answer.get("heartbeat") or {})
        self.edges = [dict(e) for e in answer.get("edges", [])]
        if not self.edges:
            raise ViewerError(f"playback of {c.title!r} offered no edge")
        self._queries = [urlsplit(str(e["hls"])).query for e in self.edges]
        self.first_edge = str(self.edges[0]["edge_id"])
        self.live = bool(answer.get("live"))
        if self.live and c.speed != 1:
            raise ViewerError(
                f"{c.title!r} is a live channel: it plays at speed 1, not {c.speed:g}"
            )

    async def _title(self) -> Title:
        got = await self._get("title.json", keep=True)
        try:
            return decode_title(got.body or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ViewerError(f"title.json of {self.config.title!r} is not usable: {exc}") from None

    def _abr_state(self, k: int, manifest: Manifest) -> AbrState:
        return AbrState(
            buffer_s=self.playout.buffer_s,
            max_buffer_s=self.config.max_buffer_s,
            segment_s=manifest.segment_s,
            rungs=manifest.rungs,
            next_segment=k,
            last_rung=self.ledger.last_rung,
            phase=self.playout.phase,
            downloads=tuple(self._downloads[-self.config.history :]),
            now_s=self.now(),
            segment_durations_s=manifest.segment_durations_s,
        )

    async def _play(self, title: Title) -> None:
        c = self.config
        base = manifest_from_title(title)
        n = len(base.segment_durations_s)
        at = self.playout.start_position_s
        if at >= base.duration_s - base.segment_durations_s[-1]:
            at = 0.0  # resuming in the last segment: from the start, as a player offers
        total = at + (c.duration_s if c.duration_s is not None else base.duration_s - at)
        manifest = loop_manifest(base, total) if total > base.duration_s else base
        durs = manifest.segment_durations_s
        if c.max_buffer_s < manifest.segment_s:
            raise ViewerError(
                f"max buffer {c.max_buffer_s:g} s is shorter than a segment"
                f" ({manifest.segment_s:g} s)"
            )
        ends = list(itertools.accumulate(durs))
        count = next((k + 1 for k, e in enumerate(ends) if e >= total - 1e-9), len(durs))
        start = next((k for k in range(count) if ends[k] > at + 1e-9), 0)
        self.playout.start_position_s = ends[start] - durs[start]
        startup = c.startup_buffer_s if c.startup_buffer_s is not None else durs[start]
        self.playout.startup_buffer_s = min(max(startup, 1e-3), c.max_buffer_s)
        rungs = sorted(title.rungs, key=lambda r: r.average_bitrate_bps)  # as the manifest's

        audio = title.audio[0] if c.audio and title.audio else None
        plan: list[tuple[int, ...]] = [() for _ in range(n)]
        if audio is not None:
            title_ends = [s.start_s + s.duration_s for s in title.segments]
            plan = audio_plan(title_ends, [a.start_ticks / audio.timescale for a in audio.segments])
            await self._get(audio.init)
        inits: set[int] = set()

        for k in range(start, count):
            d = durs[k]
            self._tick()
            wait = self.playout.make_room(d)
            self._tick()
            if wait > 0:
                await self.sleep_until(self.playout.t + wait)
                self._tick()
            rung = checked_choice(self.abr, self._abr_state(k, manifest))
            if audio is not None:
                for a in plan[k % n]:
                    await self._get(f"{posixpath.dirname(audio.init)}/seg_{a + 1}.m4s")
            abandoned = 0
            while True:
                if rung not in inits:
                    await self._get(rungs[rung].init)
                    inits.add(rung)
                path = f"{posixpath.dirname(rungs[rung].init)}/seg_{k % n + 1}.m4s"
                got = await self._get(path, segment=(manifest, k, rung))
                if got.abandoned_to is None:
                    break
                if got.nbytes > 0:
                    self._downloads.append(Download(got.nbytes * 8, got.seconds, self.now()))
                abandoned += 1
                self.ledger.abandoned += 1
                rung = got.abandoned_to
            self._downloads.append(Download(got.nbytes * 8, got.seconds, self.now()))
            self._tick()
            stalled = self.playout.stalled
            self.playout.arrived(self.now(), d)
            info = manifest.rungs[rung]
            switched = self.ledger.segment(
                SegmentRecord(
                    index=k,
                    rung=rung,
                    bitrate_kbps=info.bitrate_kbps,
                    bytes=got.nbytes,
                    vmaf=info.segment_vmaf[k] if k < len(info.segment_vmaf) else None,
                    download_s=got.seconds,
                    edge=str(self.edges[self.edge_index]["edge_id"]),
                    abandoned=abandoned,
                )
            )
            self._tick()
            if stalled:
                self.status = "playing"
                self._event("resume")
            if switched:
                self._event("bitrate")
        end = self.playout.finish(self.now())
        self._tick()
        await self.sleep_until(end)
        self._tick()

    # -- live ---------------------------------------------------------------------------------

    async def _live_playlist(self, path: str, want: tuple[int, int] | None) -> LivePlaylist:
        """The media playlist at ``path``; with ``want``, a blocking reload for that part."""
        if want is not None:
            path = f"{path}?_HLS_msn={want[0]}&_HLS_part={want[1]}"
        got = await self._get(path, keep=True)
        try:
            return parse_live_playlist((got.body or b"").decode())
        except (ManifestError, UnicodeDecodeError) as exc:
            raise ViewerError(f"{path} of {self.config.title!r} is not usable: {exc}") from None

    async def _play_live(self) -> None:
        """Play a live channel as hls.js does in low-latency mode (see `player/live.py`): join
        PART-HOLD-BACK behind the live edge, then for each part a blocking reload for it and
        the part; hold the target latency with the play-out rate; step down rather than
        stall. With ``audio``, the audio rendition's parts beside the video's, by time."""
        c = self.config
        self.ledger.latencies = []
        master = await self._get("master.m3u8", keep=True)
        try:
            text = (master.body or b"").decode()
            variants = parse_variants(text)
            rendition = parse_audio_rendition(text) if c.audio else None
        except (ManifestError, UnicodeDecodeError) as exc:
            raise ViewerError(f"the master playlist of {c.title!r} is not usable: {exc}") from None
        bandwidths = [v.bandwidth for v in variants]
        rung = 0  # hls.js starts low on a live channel: the first parts are the startup
        paths = [_bare(v.uri) for v in variants]
        playlist = await self._live_playlist(paths[rung], None)
        for _ in range(20):  # a channel that has just begun lists no independent part yet
            if join_part(playlist) is not None:
                break
            await asyncio.sleep(playlist.part_target)
            playlist = await self._live_playlist(paths[rung], None)
        part = join_part(playlist)
        if part is None:
            raise ViewerError(f"{c.title!r} lists no part to start at")
        target = c.target_latency_s if c.target_latency_s is not None else playlist.part_hold_back
        audio = await self._live_audio_join(rendition) if rendition is not None else None
        self.playout.startup_buffer_s = min(part.duration, self.playout.max_buffer_s)
        end_at = self.now() + (c.duration_s if c.duration_s is not None else LIVE_DEFAULT_S)
        inits: set[str] = set()
        recent: list[tuple[float, float, int]] = []
        position = 0.0  # where the next part starts on the viewer's media timeline
        edge_s, edge_seen = 0.0, self.now()  # the live edge on that timeline, and when seen
        count = 0
        while self.now() < end_at:
            self._tick()
            choice = live_rung(
                rung, bandwidths, recent, self.playout.buffer_s, playlist.part_target
            )
            if choice != rung:  # parts are numbered alike in every rung
                rung = choice
                playlist = await self._live_playlist(paths[rung], part.number)
                found = next((p for p in playlist.parts if p.number == part.number), None)
                if found is None:
                    raise ViewerError(f"rung {paths[rung]} has no part {part.number}")
                part = found
            directory = posixpath.dirname(paths[rung])
            if playlist.map_uri is not None:
                init = posixpath.join(directory, _bare(playlist.map_uri))
                if init not in inits:
                    await self._get(init)
                    inits.add(init)
            wait = self.playout.make_room(part.duration)
            if wait > 0:
                await self.sleep_until(self.playout.t + wait)
            started = self.now()
            got = await self._get(
                posixpath.join(directory, _bare(part.uri)), keep=self.on_part is not None
            )
            took = self.now() - started
            self._tick()
            stalled = self.playout.stalled
            self.playout.arrived(self.now(), part.duration)
            if self.on_part is not None:
                init_path = posixpath.join(directory, _bare(playlist.map_uri or ""))
                self.on_part(part, init_path, got.body or b"", time.time())
            self._downloads.append(Download(got.nbytes * 8, max(took, 1e-9), self.now()))
            recent = [*recent[-7:], (took, part.duration, rung)]
            switched = self.ledger.segment(
                SegmentRecord(
                    index=count,
                    rung=rung,
                    bitrate_kbps=bandwidths[rung] / 1000,
                    bytes=got.nbytes,
                    vmaf=None,
                    download_s=took,
                    edge=str(self.edges[self.edge_index]["edge_id"]),
                    abandoned=0,
                )
            )
            count += 1
            if stalled:
                self.status = "playing"
                self._event("resume")
            if switched:
                self._event("bitrate")
            position += part.duration
            if audio is not None:
                await self._live_audio_until(audio, position)
            after = part_after(playlist, part.number)
            if after is None:  # at the live edge: hold a reload until the next part exists
                playlist = await self._live_playlist(paths[rung], next_number(part.number))
                after = part_after(playlist, part.number)
                if after is None:  # no longer listed: fell behind; start again at the edge
                    self.ledger.error("live", f"fell behind the parts at {part.number}")
                    after = join_part(playlist)
                    if after is None:
                        raise ViewerError(f"{c.title!r} lists no part to go on with")
            listed = False
            ahead = 0.0
            for p in playlist.parts:  # the live edge: the end of the newest part listed
                if listed:
                    ahead += p.duration
                listed = listed or p.number == part.number
            edge_s, edge_seen = position + ahead, self.now()
            part = after
            self._tick()
            latency = edge_s + (self.now() - edge_seen) - self.playout.position_s
            if self.playout.playing:
                self.ledger.latencies.append(latency)
            self.playout.rate = playback_rate(
                latency, target, self.playout.buffer_s, playlist.part_target
            )
        self.playout.rate = 1.0
        self._tick()

    async def _live_audio_join(self, rendition: AudioRendition) -> _LiveAudio:
        """Join the audio rendition where the video joined: PART-HOLD-BACK behind its own
        live edge (its parts are numbered on their own: AAC frames do not divide the part
        target, so its parts are not the video's length)."""
        path = _bare(rendition.uri)
        playlist = await self._live_playlist(path, None)
        part = join_part(playlist)
        if part is None:
            raise ViewerError(f"{self.config.title!r} lists no audio part to start at")
        return _LiveAudio(path, playlist, part)

    async def _live_audio_until(self, audio: _LiveAudio, until_s: float) -> None:
        """Fetch audio parts, in order, until they cover the video fetched (``until_s``
        seconds since the join), as hls.js keeps its audio buffer level with its video's."""
        directory = posixpath.dirname(audio.path)
        while audio.fetched_s < until_s - 1e-6:
            if audio.playlist.map_uri is not None:
                init = posixpath.join(directory, _bare(audio.playlist.map_uri))
                if init != audio.init:
                    await self._get(init)
                    audio.init = init
            await self._get(posixpath.join(directory, _bare(audio.part.uri)))
            audio.fetched_s += audio.part.duration
            after = part_after(audio.playlist, audio.part.number)
            if after is None:  # at its live edge: a blocking reload for the next
                want = next_number(audio.part.number)
                audio.playlist = await self._live_playlist(audio.path, want)
                after = part_after(audio.playlist, audio.part.number)
                if after is None:  # no longer listed: fell behind; start again at the edge
                    self.ledger.error("live", f"audio fell behind the parts at {audio.part.number}")
                    after = join_part(audio.playlist)
                    if after is None:
                        raise ViewerError(f"{self.config.title!r} lists no audio part to go on")
            audio.part = after

    # -- requests -------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        edge = self.edges[self.edge_index]
        base = str(edge["base_url"]).rstrip("/")
        query = self._queries[self.edge_index]
        if "?" in path:  # a blocking reload's directives beside the session's token
            path, _, own = path.partition("?")
            query = f"{query}&{own}" if query else own
        return f"{base}/{self.config.title}/{path}?{query}"

    async def _get(
        self, path: str, *, keep: bool = False, segment: tuple[Manifest, int, int] | None = None
    ) -> _Got:
        """Fetch `path` of the title, failing over down the ranked edges. `segment` (manifest,
        index, rung) makes it a video segment the ABR may abandon."""
        while True:
            edge_id = str(self.edges[self.edge_index]["edge_id"])
            try:
                return await self._fetch(edge_id, path, keep, segment)
            except _EdgeFailed as exc:
                self.ledger.error(edge_id, str(exc))
                if self.edge_index + 1 >= len(self.edges):
                    raise ViewerError(f"every edge failed; the last: {exc}") from None
                self.edge_index += 1
                self.ledger.failovers += 1
                self._event("failover")

    async def _fetch(
        self, edge_id: str, path: str, keep: bool, segment: tuple[Manifest, int, int] | None
    ) -> _Got:
        c = self.config
        start = self.now()
        if self.bucket is not None:
            await self.sleep_until(start + self.bucket.latency_s(start))
        total_bits = 0
        if segment is not None:
            manifest, index, rung = segment
            sizes = manifest.rungs[rung].segment_bits
            total_bits = sizes[index] if index < len(sizes) else 0
        received = 0
        recent = RecentRate()  # this request's rate over its last second, for abandonment
        body: list[bytes] = []
        next_check = c.tick_s
        timeout = httpx.Timeout(c.request_timeout_s)
        try:
            async with self.client.stream("GET", self._url(path), timeout=timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise _EdgeFailed(f"{edge_id} answered {r.status_code} for {path}")
                async for chunk in r.aiter_bytes(c.chunk_bytes):
                    received += len(chunk)
                    if keep:
                        body.append(chunk)
                    if self.bucket is not None:
                        await self.sleep_until(self.bucket.take(self.now(), len(chunk) * 8))
                    elapsed = self.now() - start
                    if segment is None or segment[2] == 0 or elapsed < next_check:
                        continue
                    next_check = elapsed + c.tick_s
                    self._tick()
                    manifest, index, rung = segment
                    recent_bits, recent_s = recent.sample(path, elapsed, received * 8)
                    lower = checked_abandon(
                        self.abr,
                        self._abr_state(index, manifest),
                        Progress(
                            rung,
                            received * 8,
                            max(total_bits, received * 8),
                            elapsed,
                            recent_bits,
                            recent_s,
                        ),
                    )
                    if lower is not None:
                        self.ledger.request(edge_id, received)
                        return _Got(received, elapsed, abandoned_to=lower)
        except _EdgeFailed:
            self.ledger.request(edge_id, received)
            raise
        except (httpx.HTTPError, OSError) as exc:
            self.ledger.request(edge_id, received)
            raise _EdgeFailed(f"{edge_id}: {_why(exc)} for {path}") from None
        self.ledger.request(edge_id, received)
        return _Got(received, max(self.now() - start, 1e-9), b"".join(body) if keep else None)
