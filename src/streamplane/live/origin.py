"""The live origin: a channel's playlists, parts and segments over HTTP, with blocking reloads.

What the edges pull a live channel from. A media playlist asked for with ``_HLS_msn`` (and
``_HLS_part``) is held until the window holds that part (RFC 8216bis 6.2.5.2), and a request
for the part the preload hint names is held until that part exists, so a player (or an edge)
learns of a new part the moment it lands instead of polling. Every answer says how long it may
be cached, as the edge needs it: a playlist about one part target, a blocking playlist
answer (it is the window as of a given part) for a few target durations, parts and segments for
long (they never change while they exist), a part not there yet never.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from streamplane.live.ingest import Channel, LiveError
from streamplane.live.mpd import TIME_PATH
from streamplane.live.playlist import BadReload, Segment, media_playlist, reload_ready

__all__ = ["cache_control", "live_app"]

_OBJECT: Final = re.compile(r"^(?:[a-z0-9][a-z0-9_-]{0,62}/)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PART: Final = re.compile(r"^seg_(\d{1,12})\.(\d{1,6})\.m4s$")
_SEGMENT: Final = re.compile(r"^seg_(\d{1,12})\.m4s$")
_TYPES: Final = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".json": "application/json",
}


def cache_control(name: str, *, blocking: bool, part_target: float, segment_target: float) -> str:
    """The Cache-Control of a live object named ``name`` (what the edges key their TTLs on)."""
    if name.endswith((".m3u8", ".mpd")):
        if blocking:  # the playlist as of a given part: any later copy is as good
            return f"public, max-age={math.ceil(3 * segment_target)}"
        # max-age counts whole seconds: one second is the shortest it says, about two parts
        return f"public, max-age={max(1, round(part_target))}"
    if name.endswith((".m4s", ".mp4")):
        return "public, max-age=86400, immutable"
    return "no-store"


def live_app(channel: Channel) -> Starlette:
    """The HTTP origin of ``channel``: ``/<channel>/<path>``."""
    settings = channel.settings
    hold_s = 3 * settings.segment_target  # longest a blocking request is held

    def headers(name: str, blocking: bool = False) -> dict[str, str]:
        return {
            "Cache-Control": cache_control(
                name,
                blocking=blocking,
                part_target=settings.part_target,
                segment_target=settings.segment_target,
            ),
            "Access-Control-Allow-Origin": "*",
        }

    async def wait_until(predicate: Callable[[], bool]) -> bool:
        """Hold until ``predicate`` holds (True) or for ``hold_s`` at most (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_s
        async with channel.changed:
            while not predicate():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(channel.changed.wait(), remaining)
                except TimeoutError:
                    return bool(predicate())
        return True

    async def serve(request: Request) -> Response:
        if request.path_params["channel"] != settings.name:
            return _error(404, f"no live channel {request.path_params['channel']!r} here")
        path = request.path_params["path"]
        if not _OBJECT.match(path) or ".." in path:
            return _error(400, "not a live object name")
        if path == "status.json":
            return JSONResponse(channel.status(), headers=headers(path))
        if path == TIME_PATH:  # the MPD's UTCTiming: this clock, to the millisecond
            now = datetime.fromtimestamp(channel.clock(), UTC)
            iso = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
            return Response(iso, media_type="text/plain", headers=headers(path))
        if path == "manifest.mpd":
            text = channel.mpd(channel.clock())
            if text is None:
                return _error(404, "the channel has not begun", cache=False)
            return Response(text, media_type="application/dash+xml", headers=headers(path))
        rendition, _, name = path.rpartition("/")
        if rendition and rendition not in channel.tracks:
            return _error(404, f"no rendition {rendition!r} in channel {settings.name!r}")
        if rendition and name == "index.m3u8":
            return await playlist(request, rendition)
        if rendition and (whole := _SEGMENT.match(name)) is not None:
            track = channel.tracks[rendition]
            newest = track.window().segments[-1:] or None
            if newest and newest[0].duration is None and newest[0].msn == int(whole.group(1)):
                return _growing(rendition, newest[0].msn, headers(name))
        if rendition:
            match = _PART.match(name)
            if match is not None:
                wanted = (int(match.group(1)), int(match.group(2)))
                track = channel.tracks[rendition]
                if track.window().next_part() == wanted:  # the preload hint: hold until it lands
                    landed = await wait_until(lambda: track.window().next_part() > wanted)
                    if not landed:
                        return _error(503, "the hinted part did not arrive in time", cache=False)
        file = settings.directory / path
        if not file.is_file():
            return _error(404, f"{path} is not in the channel's window", cache=False)
        suffix = file.suffix
        return FileResponse(
            file, media_type=_TYPES.get(suffix, "application/octet-stream"), headers=headers(name)
        )

    async def playlist(request: Request, rendition: str) -> Response:
        query = request.query_params
        msn_text, part_text = query.get("_HLS_msn"), query.get("_HLS_part")
        if part_text is not None and msn_text is None:
            return _error(400, "_HLS_part without _HLS_msn")
        track = channel.tracks[rendition]
        blocking = msn_text is not None
        if msn_text is not None:
            try:
                msn = int(msn_text)
                part = int(part_text) if part_text is not None else None
                reload_ready(track.window(), msn, part)  # refuses what can never be answered
            except ValueError as exc:
                if isinstance(exc, BadReload):
                    return _error(400, str(exc))
                return _error(400, "_HLS_msn and _HLS_part are whole numbers")
            if not await wait_until(lambda: reload_ready(track.window(), msn, part)):
                return _error(503, "the requested part did not arrive in time", cache=False)
        window = track.window()
        if not window.segments:
            return _error(404, "the channel has not begun", cache=False)
        return Response(
            media_playlist(window),
            media_type=_TYPES[".m3u8"],
            headers=headers("index.m3u8", blocking=blocking),
        )

    def _growing(rendition: str, msn: int, head: dict[str, str]) -> Response:
        """The segment being written, chunk by chunk as its parts land (low-latency DASH):
        the same bytes its file will hold. A segment that stops growing for the hold time is
        cut off without the chunked ending, so no cache mistakes it for whole."""
        track = channel.tracks[rendition]
        directory = settings.directory / rendition

        def segment() -> Segment | None:
            return next((s for s in track.window().segments if s.msn == msn), None)

        def moved(sent: int) -> bool:
            seg = segment()
            return seg is None or seg.duration is not None or len(seg.parts) > sent

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            while True:
                seg = segment()
                if seg is None:
                    raise LiveError(f"{rendition}/seg_{msn}.m4s left the window while sent")
                for part in seg.parts[sent:]:
                    yield (directory / part.uri).read_bytes()
                    sent += 1
                if seg.duration is not None:
                    return
                grew = await wait_until(functools.partial(moved, sent))
                if not grew:
                    raise LiveError(f"{rendition}/seg_{msn}.m4s stopped growing")

        return StreamingResponse(body(), media_type=_TYPES[".m4s"], headers=head)

    return Starlette(routes=[Route("/{channel}/{path:path}", serve, methods=["GET", "HEAD"])])


def _error(status: int, message: str, cache: bool = True) -> Response:
    headers = {"Access-Control-Allow-Origin": "*"}
    if not cache:
        headers["Cache-Control"] = "no-store"
    return JSONResponse({"error": message}, status_code=status, headers=headers)
