"""``streamplane live start``: a channel's ingest and its origin in one process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

from streamplane.live.ingest import Channel, ChannelSettings, LiveError, Rung
from streamplane.live.origin import live_app
from streamplane.live.track import Fragment

__all__ = ["PID_FILE", "SyntheticOrigin", "record_on_stop", "recording_path", "serve_channel"]

log = logging.getLogger("streamplane.live")


PID_FILE: Final = "channel.pid"  # in the channel's directory while it runs: `live stop` reads it


async def serve_channel(
    settings: ChannelSettings,
    host: str,
    port: int,
    *,
    access_log: bool = False,
    record_to: Path | None = None,
) -> None:
    """Run ``settings``'s channel and its HTTP origin on ``host:port`` until SIGINT/SIGTERM.

    The channel's open segments are closed and its playlists ended before the process exits;
    with ``record_to``, its program (what its DVR window holds) is then recorded there as a
    VOD source (``recording_path``), and the outcome put on its status.
    """
    import uvicorn

    channel = Channel(settings)
    pid_file = settings.directory / PID_FILE
    settings.directory.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    config = uvicorn.Config(
        live_app(channel),
        host=host,
        port=port,
        log_level="warning",
        access_log=access_log,
        proxy_headers=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    # uvicorn takes SIGINT/SIGTERM while it serves and raises them again once it stopped;
    # by then these handlers are back in place, so the raise ends nothing before the channel
    # closed its segments.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: None)
    from streamplane.live.srt import SrtDoor

    srt_door = SrtDoor(channel, settings.listen_host, settings.srt_port)
    srt = asyncio.create_task(srt_door.run())
    srt.add_done_callback(lambda _: setattr(server, "should_exit", True))
    ingest = asyncio.create_task(channel.run())
    ingest.add_done_callback(lambda _: setattr(server, "should_exit", True))
    door = None
    if settings.rtmp_port is not None:
        from streamplane.live.rtmp import RtmpDoor

        door = RtmpDoor(channel, settings.listen_host, settings.rtmp_port)
        rtmp = asyncio.create_task(door.run())
        rtmp.add_done_callback(lambda _: setattr(server, "should_exit", True))
    try:
        await server.serve()
    finally:
        if door is not None:
            await door.stop()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, OSError):
                await asyncio.wait_for(asyncio.shield(rtmp), 5)
        await channel.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(ingest), 10)
        await srt_door.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, OSError):
            await asyncio.wait_for(asyncio.shield(srt), 5)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # a second Ctrl-C stops a recording too
        try:
            if record_to is not None:
                await record_on_stop(channel, record_to)
        finally:
            pid_file.unlink(missing_ok=True)
    if ingest.done() and not ingest.cancelled() and ingest.exception() is not None:
        raise ingest.exception()  # type: ignore[misc]
    if srt.done() and not srt.cancelled() and srt.exception():
        raise OSError(f"the SRT port {settings.srt_port} failed: {srt.exception()}")
    if door is not None and rtmp.done() and not rtmp.cancelled() and rtmp.exception():
        raise OSError(f"the RTMP listener failed: {rtmp.exception()}")
    if not server.started:
        raise OSError(f"the live origin could not listen on {host}:{port}")


def recording_path(record_to: Path, channel: str, ended: float) -> Path:
    """Where a channel that ended at ``ended`` (UNIX seconds) is recorded in ``record_to``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ended))
    return record_to / f"{channel}-{stamp}.mp4"


async def record_on_stop(channel: Channel, record_to: Path) -> None:
    """Record the ended ``channel``'s program into ``record_to``; the outcome on its status
    (``recording``: state written, with the file, its seconds and runs; or failed, and why)."""
    from streamplane.live.record import record_channel

    settings = channel.settings
    out = recording_path(record_to, settings.name, channel.clock())
    channel.recorded({"state": "recording", "path": str(out)})
    try:
        runs = await asyncio.to_thread(record_channel, settings.directory, out)
    except Exception as exc:  # whatever stopped it is said on the status, never lost
        if not isinstance(exc, LiveError | OSError):
            exc = LiveError(f"{type(exc).__name__}: {exc}")
        log.warning("channel %s: not recorded: %s", settings.name, exc)
        channel.recorded({"state": "failed", "path": str(out), "error": str(exc)})
        return
    seconds = round(sum(r.seconds for r in runs), 3)
    log.warning("channel %s: recorded %.1f s to %s", settings.name, seconds, out)
    channel.recorded({"state": "written", "path": str(out), "seconds": seconds, "runs": len(runs)})


class SyntheticOrigin:
    """A one-rendition channel's origin on its own event loop in a thread, fed parts by the
    caller instead of an encoder, counting the requests it gets per target (path and query).

    What the edge's live tests and ``bench/live.py`` stand an edge in front of: each part lands
    exactly when the caller says, and no encoder competes for the CPU.
    """

    def __init__(self, root: Path, name: str = "ch1", rendition: Rung = Rung(240, 400)) -> None:
        import threading

        import uvicorn

        from streamplane.stack import free_port

        self.settings = ChannelSettings(
            name=name, root=root, srt_port=9, stream_key="k" * 12, rungs=(rendition,), audio=False
        )
        self.rendition = rendition.name
        self.requests: collections.Counter[str] = collections.Counter()
        self.landed: dict[tuple[int, int], float] = {}  # (msn, part) -> monotonic time
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.channel = Channel(self.settings)
        self.track = self.channel.tracks[self.rendition]
        (self.settings.directory / self.rendition).mkdir(parents=True)
        app = live_app(self.channel)

        async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                query = scope["query_string"].decode()
                self.requests[scope["path"] + (f"?{query}" if query else "")] += 1
            await app(scope, receive, send)

        config = uvicorn.Config(
            counting, host="127.0.0.1", port=self.port, log_level="error", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._server.serve(),), daemon=True
        )
        self._thread.start()
        self._call(self.channel.publish(self.rendition, self.track.begin(b"\0\0\0\x08moov")))
        self.sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def land(self, size: int = 16) -> tuple[int, int]:
        """One more part of ``size`` bytes (a keyframe every fourth); its (msn, part)."""
        i = self.sent
        body = (i.to_bytes(8, "big") * (size // 8 + 1))[:size]
        part = self.settings.part_target
        fragment = Fragment(i * part, part, i % 4 == 0, body)

        async def push() -> None:
            # On the origin's loop, as the channel's packager does: a part must not be in the
            # window (where a request being answered sees it) before its file is written.
            await self.channel.publish(self.rendition, self.track.push(fragment, time.time()))

        self._call(push())
        self.sent += 1
        where = self.track.window().last_part()
        assert where is not None
        self.landed[where] = time.monotonic()
        return where

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
